"""The interface every model family implements, and the containers it hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from dreambooth_pl.export import TEXTUAL_INVERSION_WEIGHTS


@dataclass
class Components:
    """A model's parts; text encoders and tokenizers under their pipeline names (`text_encoder`,
    `tokenizer`, `text_encoder_2`, ...), which also read as attributes: `parts.text_encoder`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str):
        for parts in ("text_encoders", "tokenizers"):
            named = self.__dict__.get(parts, {})
            if name in named:
                return named[name]
        raise AttributeError(name)


@dataclass
class PromptEmbeddings:
    """What the text side gives the denoiser: per-token hidden states, and a pooled vector where the
    family's UNet takes one (SDXL). Rows split and stack so each prompt can be cached on its own."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self) -> list[PromptEmbeddings]:
        pooled = [None] * len(self.hidden_states) if self.pooled is None else list(self.pooled)
        return [PromptEmbeddings(h, p) for h, p in zip(self.hidden_states, pooled, strict=True)]

    def to(self, dtype: torch.dtype) -> PromptEmbeddings:
        return PromptEmbeddings(self.hidden_states.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    @staticmethod
    def stack(rows: list[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEmbeddings(torch.stack([r.hidden_states for r in rows]), pooled)


class ModelFamily:
    """One model family. Subclasses set the class attributes and implement `encode_prompts`."""

    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # pipeline name -> class of each text encoder, and the tokenizer that feeds it, in pipeline order
    text_encoder_classes: ClassVar[dict[str, type]]
    tokenizer_names: ClassVar[dict[str, str]]
    # extra keyword arguments for the pipeline's constructor and from_pretrained (e.g. no safety checker)
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}

    @property
    def text_encoder_names(self) -> list[str]:
        return list(self.text_encoder_classes)

    def load_components(
        self, pretrained: str, revision: str | None = None, variant: str | None = None, vae: str | None = None
    ) -> Components:
        """`vae`: a separate VAE (hub id or folder) instead of the model's own."""
        from dreambooth_pl.models import check_pretrained, from_pretrained_or_explain, load_tokenizer

        check_pretrained(pretrained)
        weights = {"revision": revision, "variant": variant}
        return Components(
            unet=from_pretrained_or_explain(UNet2DConditionModel, pretrained, "unet", **weights),
            vae=(
                from_pretrained_or_explain(AutoencoderKL, vae, None)
                if vae
                else from_pretrained_or_explain(AutoencoderKL, pretrained, "vae", **weights)
            ),
            noise_scheduler=from_pretrained_or_explain(DDPMScheduler, pretrained, "scheduler", revision=revision),
            text_encoders={
                name: from_pretrained_or_explain(cls, pretrained, name, **weights)
                for name, cls in self.text_encoder_classes.items()
            },
            tokenizers={
                self.tokenizer_names[name]: load_tokenizer(pretrained, revision, self.tokenizer_names[name])
                for name in self.text_encoder_classes
            },
        )

    def assemble_pipeline(self, components: Components, **overrides: Any) -> DiffusionPipeline:
        """A pipeline sharing the given modules (no copies)."""
        parts = {
            "unet": components.unet,
            "vae": components.vae,
            "scheduler": components.noise_scheduler,
            **components.text_encoders,
            **components.tokenizers,
            **overrides,
        }
        return self.pipeline_class(**parts, **self.pipeline_kwargs)

    def encode_prompts(
        self, tokenizers: dict[str, Any], text_encoders: dict[str, torch.nn.Module], prompts: list[str]
    ) -> PromptEmbeddings:
        raise NotImplementedError

    def unet_conditioning(
        self,
        embeddings: PromptEmbeddings,
        original_sizes: torch.Tensor | None,
        crops_top_left: torch.Tensor | None,
        target_size: tuple[int, int],
    ) -> dict[str, Any]:
        """Keyword arguments of the UNet besides latents and timesteps. `original_sizes` and `crops_top_left`
        are (batch, 2) as (height, width) and (top, left): each image's own micro-conditioning."""
        return {"encoder_hidden_states": embeddings.hidden_states}

    def save_lora_weights(
        self,
        folder: Path,
        unet_layers: dict[str, torch.Tensor],
        text_encoder_layers: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Write the adapters where `pipe.load_lora_weights(folder)` finds them; text encoders by pipeline name."""
        self.pipeline_class.save_lora_weights(
            folder,
            unet_lora_layers=unet_layers,
            **{f"{name}_lora_layers": layers for name, layers in text_encoder_layers.items()},
            safe_serialization=True,
        )

    def textual_inversion_files(self, placeholder: str, vectors: dict[str, torch.Tensor]) -> dict[str, dict]:
        """File name -> tensors of the learned embeddings (one vector per text encoder, by pipeline name)."""
        (vector,) = vectors.values()
        return {TEXTUAL_INVERSION_WEIGHTS: {placeholder: vector}}

    def load_textual_inversion(self, pipe: DiffusionPipeline, folder: Path) -> None:
        pipe.load_textual_inversion(str(folder), weight_name=TEXTUAL_INVERSION_WEIGHTS)
