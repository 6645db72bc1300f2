"""Loading Stable-Diffusion-style components, and building random-weight ones offline.

Every model, real or tiny, goes through `load_components`: a random model is first saved in
diffusers layout and then loaded back with `from_pretrained`, so tests exercise the real code path.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTokenizer

from dreambooth_pl.models.families import Components, family_of_pipeline, get_family
from dreambooth_pl.models.hub import check_pretrained, from_pretrained_or_explain
from dreambooth_pl.runs.export import (
    LORA_WEIGHTS,
    TEXTUAL_INVERSION_WEIGHTS,
    read_export_info,
    save_pipeline_atomically,
)
from dreambooth_pl.text.vocab import build_clip_tokenizer, build_t5_tokenizer, clip_vocab_from_bpe, word_vocab
from dreambooth_pl.util.console import quiet_loading_bars
from dreambooth_pl.util.files import ProcessLock

log = logging.getLogger(__name__)
quiet_loading_bars()

def load_tokenizer(pretrained: str, revision: str | None = None, subfolder: str = "tokenizer") -> CLIPTokenizer:
    check_pretrained(pretrained)
    return from_pretrained_or_explain(CLIPTokenizer, pretrained, subfolder, revision=revision)


def load_components(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    family: str = "sd",
    vae: str | None = None,
) -> Components:
    return get_family(family).load_components(pretrained, revision, variant, vae)


def load_pipeline(
    pretrained: str,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
) -> DiffusionPipeline:
    """A whole pipeline for inference; dtype is a torch dtype name such as "float16"; `vae` a separate VAE.
    dtype None: the model's stored dtype on a GPU (bf16 for FLUX.1-dev), float32 on a CPU.

    `pretrained` may also be a LoRA or Textual Inversion export: its dreambooth.json names the base model
    (and the separate VAE it was trained with, if any).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(pretrained)
    if (folder / LORA_WEIGHTS).exists() or (folder / TEXTUAL_INVERSION_WEIGHTS).exists():
        info = read_export_info(folder)
        pipe = load_pipeline(info["base_model"], device, dtype, revision, variant, info.get("base_vae"))
        if (folder / LORA_WEIGHTS).exists():
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
        else:
            family_of_pipeline(type(pipe).__name__).load_textual_inversion(pipe, folder)
        return pipe
    check_pretrained(pretrained)
    dtype = inference_dtype(pretrained, device, dtype, revision, variant)
    extra = {"dtype": getattr(torch, dtype)} if dtype else {}
    if vae:
        extra["vae"] = from_pretrained_or_explain(AutoencoderKL, vae, None, **extra)
    # model_index.json names the pipeline class, and so the family (exports carry no config)
    index = from_pretrained_or_explain(DiffusionPipeline, pretrained, None, revision=revision, load="load_config")
    family = family_of_pipeline(index["_class_name"])
    pipe = family.pipeline_class.from_pretrained(
        pretrained, revision=revision, variant=variant, **family.pipeline_kwargs, **extra
    )
    return pipe.to(device)


def inference_dtype(
    pretrained: str, device: str, dtype: str | None = None, revision: str | None = None, variant: str | None = None
) -> str | None:
    """`dtype` where given; else the model's stored dtype on a GPU, and diffusers' float32 (None) elsewhere."""
    if dtype is None and torch.device(device).type == "cuda":
        return stored_dtype(pretrained, revision, variant)
    return dtype


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def stored_dtype(pretrained: str, revision: str | None = None, variant: str | None = None) -> str:
    """The dtype name of a pipeline's stored denoiser weights: diffusers loads any of them as float32 unless
    told, which doubles a bf16 model (FLUX.1-dev: 24 GB stored, 48 GB loaded)."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    index = from_pretrained_or_explain(DiffusionPipeline, pretrained, None, revision=revision, load="load_config")
    part = family_of_pipeline(index["_class_name"]).denoiser_name
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        folder = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{part}/*"]))
    files = sorted((folder / part).glob("*.safetensors"))
    files = [f for f in files if (f".{variant}." in f.name if variant else "." not in f.stem)] or files
    if not files:
        return "float32"  # .bin weights: diffusers' own default
    with safe_open(str(files[0]), "pt") as weights:
        floating = (weights.get_slice(k).get_dtype() for k in weights.keys())
        return next((SAFETENSORS_DTYPES[d] for d in floating if d in SAFETENSORS_DTYPES), "float32")


@contextmanager
def loaded_pipeline(
    pretrained: str,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
) -> Iterator[DiffusionPipeline]:
    """A pipeline for one block of generation; its memory (GPU included) is released afterwards."""
    pipe = load_pipeline(pretrained, device, dtype, revision, variant, vae)
    try:
        yield pipe
    finally:
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tokenizer_from_config(
    tokenizer_class: type, words: list[str], clip_bpe: str | None, model_max_length: int, t5_max_length: int = 512
):
    """A CLIP tokenizer (real BPE or one token per word), or for T5 encoders a T5 tokenizer of the words."""
    if tokenizer_class is not CLIPTokenizer:
        return build_t5_tokenizer(words, model_max_length=t5_max_length)
    vocab, merges = clip_vocab_from_bpe(clip_bpe) if clip_bpe else word_vocab(words)
    return build_clip_tokenizer(vocab, merges, model_max_length=model_max_length)


def _random_text_encoder(cls: type, tokenizer, config: dict) -> torch.nn.Module:
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if cls.config_class is CLIPTextConfig:
        size = {"bos_token_id": tokenizer.bos_token_id, "max_position_embeddings": tokenizer.model_max_length}
        return cls(CLIPTextConfig(vocab_size=len(tokenizer), **size, **special, **config))
    return cls(cls.config_class(vocab_size=len(tokenizer), decoder_start_token_id=0, **special, **config))


def build_random_pipeline(
    cache_dir: str,
    seed: int,
    tokenizer: dict,
    text_encoders: dict[str, dict],
    vae: dict,
    scheduler: dict,
    scheduler_class: str = "DDPMScheduler",
    family: str = "sd",
    **denoiser: dict,
) -> str:
    """Build a pipeline of the family's architecture with random weights, once per config; return its folder.

    `text_encoders` maps each of the family's text encoders (pipeline name) to its config (CLIP or T5);
    CLIP tokenizers share one vocabulary, T5 ones get the same words. The denoiser's config comes under its
    pipeline name (`unet=...`, `transformer=...`). The folder name hashes the whole config, so any change
    gives a new model and class images cached under the old one are never reused by mistake.
    `scheduler_class` is the inference scheduler saved with it (Stable Diffusion 1.x ships PNDM); training
    reads the schedule with the family's training scheduler (DDPM, flow matching).
    """
    model_family = get_family(family)
    if set(denoiser) != {model_family.denoiser_name}:
        raise ValueError(
            f"model.pretrained: family {family!r} needs its denoiser's config as {model_family.denoiser_name}"
        )
    spec = {
        "family": family,
        "seed": seed,
        "tokenizer": tokenizer,
        "text_encoders": text_encoders,
        **denoiser,
        "vae": vae,
        "scheduler": scheduler,
        "scheduler_class": scheduler_class,
    }
    spec = OmegaConf.to_container(OmegaConf.create(spec), resolve=True)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"random-{family}-{digest}"
    if (target / "model_index.json").exists():
        return str(target)

    # Jobs started together (SLURM tasks, parallel sweep jobs) build it once: the others wait, then load it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with ProcessLock(target.parent / f".{target.name}.lock", "the random-weight model being built"):
        if (target / "model_index.json").exists():
            return str(target)
        log.info("Building a random-weight pipeline in %s", target)
        if set(spec["text_encoders"]) != set(model_family.text_encoder_names):
            raise ValueError(
                f"model.pretrained.text_encoders: family {family!r} has {', '.join(model_family.text_encoder_names)}"
            )
        tokenizers = {
            model_family.tokenizer_names[name]: _tokenizer_from_config(
                model_family.tokenizer_class(model_family.tokenizer_names[name]), **spec["tokenizer"]
            )
            for name in model_family.text_encoder_names
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoders = {
                name: _random_text_encoder(
                    cls, tokenizers[model_family.tokenizer_names[name]], spec["text_encoders"][name]
                )
                for name, cls in model_family.text_encoder_classes.items()
            }
            components = Components(
                denoiser=model_family.denoiser_class(**spec[model_family.denoiser_name]),
                vae=AutoencoderKL(**spec["vae"]),
                noise_scheduler=model_family.noise_scheduler_class.from_config(spec["scheduler"]),
                text_encoders=text_encoders,
                tokenizers=tokenizers,
                denoiser_name=model_family.denoiser_name,
            )
        inference_scheduler = getattr(diffusers, scheduler_class).from_config(spec["scheduler"])
        save_pipeline_atomically(model_family.assemble_pipeline(components, scheduler=inference_scheduler), target)
    return str(target)
