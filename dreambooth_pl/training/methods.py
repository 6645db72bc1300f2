"""What a run trains and exports: full DreamBooth fine-tuning, LoRA DreamBooth, or Textual Inversion.

The LightningModule, data, loss and loop are shared; a method only decides which parameters learn,
what happens after an optimizer step, and what is written at the end. So all three run on the same data
with the same evaluation, and their numbers sit in one table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth_pl.runs.export import (
    LORA_KOHYA_WEIGHTS,
    LORA_WEIGHTS,
    save_pipeline_atomically,
    write_dir_atomically,
)
from dreambooth_pl.runs.layout import LORA_DIR, PIPELINE, TEXTUAL_INVERSION_DIR

log = logging.getLogger(__name__)


class FineTuneMethod:
    """Full fine-tuning of the denoiser (and optionally the text encoders the family trains): the paper's
    DreamBooth."""

    export_dirname = PIPELINE
    trains_adapters = False  # whether the base weights stay frozen (a 4-bit base needs that)
    learns_token_only = False  # whether only a new token's embedding learns (a family may refuse that)

    def __init__(self, name: str = "dreambooth", train_text_encoder: bool = False):
        self.name = name
        self.train_text_encoder = train_text_encoder

    def prompt_token(self, identifier: str) -> str:
        """The string that stands for the subject in prompts."""
        return identifier

    def keeps_full_precision(self, model_name: str, text_encoder_names: list[str]) -> bool:
        """Whether a model of the module stays whole in fp32 under half-precision training."""
        return False

    def attach(self, module) -> None:
        """Mark what trains; everything starts frozen."""
        module.denoiser.requires_grad_(True)
        for name in self.text_encoders_trained(module):
            module.text_encoders[name].requires_grad_(True)

    def text_encoders_trained(self, module) -> list[str]:
        return module.family.trainable_text_encoders if self.train_text_encoder else []

    def after_optimizer_step(self, module) -> None:
        """Hook for methods that constrain their parameters after each update."""

    def export(self, module, output_dir: Path, export_info: dict, dtype: str | None = None) -> Path:
        """The base model as published (its frozen weights, its inference scheduler) with the learned weights
        copied in, in `dtype` (export.dtype; None: the base's stored dtype, so a bf16 base is not doubled):
        under half-precision training the module holds rounded copies of the frozen parts and a training
        (DDPM) scheduler, neither of which belongs in an export."""
        pipe = base_pipeline(module, dtype)
        for name in [module.denoiser_name, *self.text_encoders_trained(module)]:
            getattr(pipe, name).load_state_dict(getattr(module, name).state_dict())
        return save_pipeline_atomically(pipe, output_dir / self.export_dirname, export_info)


def base_pipeline(module, dtype: str | None = None):
    """The module's base model on the CPU, in `dtype` or else its stored one."""
    from dreambooth_pl.models.pipelines import load_pipeline, stored_dtype

    base = module.hparams
    dtype = dtype or stored_dtype(base.pretrained, base.revision, base.variant)
    return load_pipeline(base.pretrained, "cpu", dtype, base.revision, base.variant, base.vae)


def with_base_vae(export_info: dict, module) -> dict:
    """Adapter and embedding exports load on top of the base model: they name its separate VAE, if any."""
    vae = module.hparams.get("vae")
    return {**export_info, "base_vae": vae} if vae else export_info


def transformers4_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 dropped CLIPTextModel's `text_model.` level: LoRA files keep the names transformers 4
    gave, which ComfyUI, kohya's tools and transformers 4 models look up (diffusers reads either)."""
    from transformers import CLIPTextModel

    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        return {f"text_model.{key}": value for key, value in state.items()}
    return state


class LoRA(FineTuneMethod):
    """Low-rank adapters (peft) on the denoiser's attention projections (or `target_modules`: the model
    files name their recipe's, model.lora.target_modules); base weights stay frozen."""

    export_dirname = LORA_DIR
    trains_adapters = True

    def __init__(
        self,
        name: str = "lora",
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        train_text_encoder: bool = False,
        text_encoder_target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj"),
        export_merged: bool = False,
        export_kohya: bool = False,
    ):
        super().__init__(name, train_text_encoder)
        self.rank = rank
        self.alpha = rank if alpha is None else alpha  # the diffusers scripts' alpha = rank (scale 1)
        self.dropout = dropout
        self.target_modules = list(target_modules)
        self.text_encoder_target_modules = list(text_encoder_target_modules)
        self.export_merged = export_merged
        self.export_kohya = export_kohya

    def _config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def attach(self, module) -> None:
        if self.export_kohya and module.family.kohya_refusal:
            raise ValueError(module.family.kohya_refusal)
        module.denoiser.add_adapter(self._config(self.target_modules))
        # peft directly: transformers' own adapter integration may want a newer peft than is installed.
        from peft import inject_adapter_in_model

        for name in self.text_encoders_trained(module):
            inject_adapter_in_model(self._config(self.text_encoder_target_modules), module.text_encoders[name])

    def lora_state(self, model) -> dict[str, torch.Tensor]:
        """The adapters under peft's names with alpha / rank folded into every up projection (`lora_B`,
        whatever the target): loaders that find no alpha in the file (every diffusers version, without
        adapter metadata) assume alpha = rank, scale 1."""
        from peft.utils import get_peft_model_state_dict

        state = transformers4_names(model, get_peft_model_state_dict(model, state_dict=model.state_dict()))
        scale = self.alpha / self.rank
        return {
            k: (v.detach().float().cpu() * (scale if ".lora_B." in k else 1.0)).contiguous() for k, v in state.items()
        }

    def write_lora_files(self, staging: Path, family, layers: dict[str, dict[str, torch.Tensor]]) -> None:
        """`layers`: pipeline name -> adapters. The family's LoRA file (its loader's names) and, with
        `export_kohya`, the same adapters through diffusers' `convert_state_dict_to_kohya` (what the SDXL
        scripts' `--output_kohya_format` writes for Automatic1111, ComfyUI and kohya's tools), converted from
        peft's names: alpha is written as the rank, alpha / rank being folded into the up weights already."""
        named = {name: family.lora_file_keys(state) for name, state in layers.items()}
        family.save_lora_weights(staging, named.pop(family.denoiser_name), named)
        if self.export_kohya:
            from diffusers.utils import convert_state_dict_to_kohya

            peft = {f"{name}.{key}": value for name, state in layers.items() for key, value in state.items()}
            save_file(convert_state_dict_to_kohya(peft), staging / LORA_KOHYA_WEIGHTS)

    def export(self, module, output_dir: Path, export_info: dict, dtype: str | None = None) -> Path:
        """The adapters in fp32 (as the diffusers scripts save them); `dtype` is the merged pipeline's."""
        trained = [module.denoiser_name, *self.text_encoders_trained(module)]
        layers = {name: self.lora_state(getattr(module, name)) for name in trained}
        target = write_dir_atomically(
            output_dir / self.export_dirname,
            lambda staging: self.write_lora_files(staging, module.family, layers),
            with_base_vae(export_info, module),
        )
        if self.export_merged:
            merged = base_pipeline(module, dtype)
            merged.load_lora_weights(str(target), weight_name=LORA_WEIGHTS)
            merged.fuse_lora()
            merged.unload_lora_weights()
            save_pipeline_atomically(merged, output_dir / PIPELINE, export_info)
        return target


class TextualInversion(FineTuneMethod):
    """The paper's baseline (Gal et al. 2022): learn one new token embedding, nothing else (one per text
    encoder where the model has several: SDXL)."""

    export_dirname = TEXTUAL_INVERSION_DIR
    learns_token_only = True

    def __init__(self, name: str = "textual_inversion", placeholder: str = "<{identifier}>", initializer: str = ""):
        super().__init__(name, train_text_encoder=False)
        self.placeholder_format = placeholder
        self.initializer = initializer
        self.placeholder: str | None = None
        self.token_ids: dict[str, int] = {}  # per text encoder (pipeline name)
        self.original_embeddings: dict[str, torch.Tensor] = {}

    def keeps_full_precision(self, model_name: str, text_encoder_names: list[str]) -> bool:
        """The learned embedding feeds every text-encoder layer: fp32 rows into bf16 layer norms fail on a
        CPU, and the diffusers example keeps the (small) text encoders in fp32 for the same reason."""
        return model_name in text_encoder_names

    def prompt_token(self, identifier: str) -> str:
        self.placeholder = self.placeholder_format.format(identifier=identifier)
        return self.placeholder

    def attach(self, module) -> None:
        if module.family.textual_inversion_refusal:
            raise ValueError(module.family.textual_inversion_refusal)
        if self.placeholder is None:
            raise RuntimeError("TextualInversion.prompt_token must be called before the module is built")
        for name, text_encoder in module.text_encoders.items():
            tokenizer = module.tokenizers[module.family.tokenizer_names[name]]
            if tokenizer.add_tokens(self.placeholder) != 1:
                raise ValueError(f"method.placeholder: {self.placeholder!r} is already a token; choose another.")
            init_ids = tokenizer(self.initializer, add_special_tokens=False).input_ids
            if not init_ids:
                raise ValueError("method.initializer (the class noun by default) is empty: it seeds the new embedding.")
            text_encoder.resize_token_embeddings(len(tokenizer))
            token_id = tokenizer.convert_tokens_to_ids(self.placeholder)
            embeddings = text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                embeddings[token_id] = embeddings[init_ids].mean(dim=0)
            self.token_ids[name] = token_id
            self.original_embeddings[name] = embeddings.detach().clone()
            embeddings.requires_grad_(True)

    def after_optimizer_step(self, module) -> None:
        """Put every other row back: weight decay and momentum must not touch the vocabulary."""
        for name, text_encoder in module.text_encoders.items():
            embeddings = text_encoder.get_input_embeddings().weight
            keep = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
            keep[self.token_ids[name]] = False
            with torch.no_grad():
                embeddings[keep] = self.original_embeddings[name].to(embeddings)[keep]

    def export(self, module, output_dir: Path, export_info: dict, dtype: str | None = None) -> Path:
        """The learned vectors in fp32, whatever `dtype` (they are loaded into the pipeline's own)."""
        vectors = {
            name: encoder.get_input_embeddings().weight[self.token_ids[name]].detach().float().cpu().clone()
            for name, encoder in module.text_encoders.items()
        }
        files = module.family.textual_inversion_files(self.placeholder, vectors)

        def write(staging: Path) -> None:
            for filename, tensors in files.items():
                save_file(tensors, staging / filename)

        return write_dir_atomically(
            output_dir / self.export_dirname,
            write,
            {**with_base_vae(export_info, module), "placeholder": self.placeholder},
        )
