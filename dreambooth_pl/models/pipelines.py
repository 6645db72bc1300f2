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

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.console import quiet_loading_bars
from dreambooth_pl.runs.export import (
    LORA_WEIGHTS,
    TEXTUAL_INVERSION_WEIGHTS,
    read_run_info,
    save_pipeline_atomically,
)
from dreambooth_pl.models.families import Components, family_of_pipeline, get_family
from dreambooth_pl.runs.files import ProcessLock
from dreambooth_pl.util.network import server_reachable
from dreambooth_pl.text.vocab import build_clip_tokenizer, build_t5_tokenizer, clip_vocab_from_bpe, word_vocab

log = logging.getLogger(__name__)
quiet_loading_bars()

# What a folder without model_index.json is checked against (a Stable Diffusion pipeline's parts); one with
# it must have every part its model_index.json lists.
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Per kind of part, groups of file patterns of which each group needs a match (weights may be .bin, sharded
# or a variant such as .fp16.safetensors).
_WEIGHTS = ("*.safetensors", "*.bin")
REQUIRED_FILES = {
    "model": [("config.json",), _WEIGHTS],
    "tokenizer": [("*.json", "*.txt", "*.model")],
    "scheduler": [("scheduler_config.json",)],
}


def _part_kind(subfolder: str) -> str:
    return next((kind for kind in ("tokenizer", "scheduler") if subfolder.startswith(kind)), "model")


def pipeline_parts(folder: Path) -> list[str]:
    """The subfolders a pipeline folder must have: those its model_index.json names (optional parts that are
    null excluded), else a Stable Diffusion pipeline's."""
    index = folder / "model_index.json"
    if not index.is_file():
        return list(PIPELINE_SUBFOLDERS)
    entries = json.loads(index.read_text())
    return [k for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None]


INDEX_FILES = ("model_index.json", "config.json")  # a pipeline's, a single model's (DINO, CLIP)


class ModelNotReachable(ConfigError):
    """The configured weights are neither a local diffusers folder nor downloadable."""


def check_pretrained(pretrained: str) -> None:
    """Fail before any expensive work when a local folder is not a diffusers pipeline."""
    path = Path(pretrained).expanduser()
    looks_local = path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise ModelNotReachable(f"model.pretrained={pretrained!r}: no such folder.")
    parts = pipeline_parts(path)
    missing = [name for name in ("model_index.json", *parts) if not (path / name).exists()]
    if missing:
        raise ModelNotReachable(
            f"model.pretrained={pretrained!r} is not a diffusers pipeline folder (missing: {', '.join(missing)}). "
            "Point it at a folder written by `StableDiffusionPipeline.save_pretrained`."
        )
    incomplete = [
        f"{sub}/ has no {' or '.join(patterns)}"
        for sub in parts
        for patterns in REQUIRED_FILES[_part_kind(sub)]
        if not any(next((path / sub).glob(pattern), None) for pattern in patterns)
    ]
    if incomplete:
        raise ModelNotReachable(
            f"model.pretrained={pretrained!r} is an incomplete diffusers pipeline folder: {'; '.join(incomplete)}. "
            "An interrupted download or copy? Copy the model again."
        )


def model_fingerprint(pretrained: str) -> str:
    """A digest of a model's contents, for caches of what it renders: a local folder is read as its
    files' names, sizes and modification times (and whole config files), so replacing the weights at the
    same path gives a new fingerprint; a hub id stands for itself (its revision is keyed separately)."""
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        return f"hub:{pretrained}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        if path.suffix in (".json", ".txt"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def download_hint(option: str, model_id: str = "<id>") -> str:
    """What to do when the Hub is out of reach, with the download command the installed huggingface_hub has."""
    return (
        f"Download the model where there is network access (`hf download {model_id} --local-dir /path`), "
        f"copy the folder here and set {option}=/path."
    )


def require_reachable(model_id: str, option: str, revision: str | None = None, timeout: float = 5.0) -> None:
    """Fail in seconds, before any work, when hub weights are neither cached nor downloadable.

    Local folders are checked where they are loaded. Without this, an unreachable Hub costs minutes of
    retries (and, for evaluation, comes after the whole training run).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists() or model_id.count("/") > 1:
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise ModelNotReachable(f"{option}={model_id!r}: no such folder ({folder.absolute()}).")
        if not any((folder / name).is_file() for name in INDEX_FILES):
            raise ModelNotReachable(
                f"{option}={model_id!r} is not a model folder (no {' or '.join(INDEX_FILES)}): an incomplete copy? "
                "Copy the model folder again."
            )
        return
    if any(isinstance(try_to_load_from_cache(model_id, name, revision=revision), str) for name in INDEX_FILES):
        return
    if constants.HF_HUB_OFFLINE:
        problem = "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    elif not server_reachable(constants.ENDPOINT, timeout):
        problem = f"not in the local Hugging Face cache ({constants.ENDPOINT} is not reachable)"
    else:
        return
    raise ModelNotReachable(
        f"{option}={model_id!r} is no local folder ({Path(model_id).absolute()}) and {problem}. "
        f"{download_hint(option, model_id)}"
    )


def from_pretrained_or_explain(cls, pretrained: str, subfolder: str | None, load: str = "from_pretrained", **kwargs):
    """`cls.from_pretrained` (or another loader of `cls`), with an error that says how to get it offline."""
    try:
        return getattr(cls, load)(pretrained, subfolder=subfolder, **kwargs)
    except OSError as err:
        option = "model.pretrained" if subfolder else "model.vae"
        part = f"'{subfolder}' of {option}" if subfolder else option
        if Path(pretrained).expanduser().is_dir():
            raise ModelNotReachable(
                f"{option}={pretrained!r} is a damaged model folder: {part} cannot be read "
                f"({str(err).splitlines()[0]}). A truncated or interrupted copy? Copy the model folder again."
            ) from None
        raise ModelNotReachable(
            f"Could not load {part}={pretrained!r}: {err}\n"
            f"{download_hint(option, pretrained)} Or use model=tiny, which needs no download."
        ) from err


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

    `pretrained` may also be a LoRA or Textual Inversion export: its dreambooth.json names the base model
    (and the separate VAE it was trained with, if any).
    """
    folder = Path(pretrained)
    if (folder / LORA_WEIGHTS).exists() or (folder / TEXTUAL_INVERSION_WEIGHTS).exists():
        info = read_run_info(folder)
        pipe = load_pipeline(info["base_model"], device, dtype, revision, variant, info.get("base_vae"))
        if (folder / LORA_WEIGHTS).exists():
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
        else:
            family_of_pipeline(type(pipe).__name__).load_textual_inversion(pipe, folder)
        return pipe
    check_pretrained(pretrained)
    extra = {"dtype": getattr(torch, dtype)} if dtype else {}
    if vae:
        extra["vae"] = from_pretrained_or_explain(AutoencoderKL, vae, None, **extra)
    # model_index.json names the pipeline class, and so the family (exports carry no config)
    index = from_pretrained_or_explain(DiffusionPipeline, pretrained, None, revision=revision, load="load_config")
    family = family_of_pipeline(index["_class_name"])
    pipe = family.pipeline_class.from_pretrained(
        pretrained, revision=revision, variant=variant, **family.pipeline_kwargs, **extra
    )
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
