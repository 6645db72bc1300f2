"""The interface every model family implements, and the containers it hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dreambooth_pl.models.hub import check_pretrained, from_pretrained_or_explain
from dreambooth_pl.models.objectives import NoisePrediction
from dreambooth_pl.runs.export import TEXTUAL_INVERSION_WEIGHTS


@dataclass
class Components:
    """A model's parts; the denoiser (UNet or transformer), text encoders and tokenizers also read under
    their pipeline names (`parts.unet`, `parts.transformer`, `parts.text_encoder`, `parts.tokenizer_2`)."""

    denoiser: torch.nn.Module
    vae: AutoencoderKL
    noise_scheduler: Any
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    denoiser_name: str = "unet"

    def __getattr__(self, name: str):
        if name == self.__dict__.get("denoiser_name"):
            return self.__dict__["denoiser"]
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
    """One model family. Subclasses set the class attributes and implement `encode_prompts`; a family
    with its own options (FLUX's guidance input) takes them as constructor keywords (`module.family_options`)."""

    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # the denoiser under its pipeline name, and the scheduler class whose config defines the training noise
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class: ClassVar[type[torch.nn.Module]] = UNet2DConditionModel
    noise_scheduler_class: ClassVar[type] = DDPMScheduler
    # pipeline name -> class of each text encoder, and the tokenizer that feeds it, in pipeline order
    text_encoder_classes: ClassVar[dict[str, type]]
    tokenizer_names: ClassVar[dict[str, str]]
    tokenizer_classes: ClassVar[dict[str, type]] = {}  # tokenizer name -> class; CLIPTokenizer if not named
    # the text encoders `train_text_encoder` trains (the LoRA scripts of FLUX and SD3 leave T5 frozen)
    trainable_text_encoder_names: ClassVar[list[str] | None] = None  # None: all
    # why Textual Inversion is not offered on this family, if it is not
    textual_inversion_refusal: ClassVar[str | None] = None
    # why a kohya-format LoRA file (method.export_kohya) is not offered on this family, if it is not
    kohya_refusal: ClassVar[str | None] = None
    # why trainer=fsdp is refused on this family, if it is (conf/trainer/fsdp.yaml wraps the module as one unit)
    fsdp_refusal: ClassVar[str | None] = None
    # extra keyword arguments for the pipeline's constructor and from_pretrained (e.g. no safety checker)
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}

    @property
    def text_encoder_names(self) -> list[str]:
        return list(self.text_encoder_classes)

    @property
    def trainable_text_encoders(self) -> list[str]:
        names = self.trainable_text_encoder_names
        return self.text_encoder_names if names is None else list(names)

    def tokenizer_class(self, name: str) -> type:
        return self.tokenizer_classes.get(name, CLIPTokenizer)

    def objective(self, noise_scheduler, snr_gamma: float | None = None, **options):
        """The training objective on this family's schedule: eps / v prediction here (Min-SNR optional)."""
        if options:
            raise ValueError(
                f"module.objective {sorted(options)}: flow-matching options, but model.family "
                f"({self.pipeline_class.__name__}) trains with {noise_scheduler.config.prediction_type} prediction."
            )
        return NoisePrediction(noise_scheduler, snr_gamma)

    def load_components(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        vae: str | None = None,
        denoiser_kwargs: dict | None = None,
    ) -> Components:
        """`vae`: a separate VAE (hub id or folder) instead of the model's own; `denoiser_kwargs`: extra
        from_pretrained arguments of the denoiser (a quantization config)."""
        check_pretrained(pretrained)
        weights = {"revision": revision, "variant": variant}
        return Components(
            denoiser=from_pretrained_or_explain(
                self.denoiser_class, pretrained, self.denoiser_name, **weights, **(denoiser_kwargs or {})
            ),
            vae=(
                from_pretrained_or_explain(AutoencoderKL, vae, None)
                if vae
                else from_pretrained_or_explain(AutoencoderKL, pretrained, "vae", **weights)
            ),
            noise_scheduler=from_pretrained_or_explain(
                self.noise_scheduler_class, pretrained, "scheduler", revision=revision
            ),
            text_encoders={
                name: from_pretrained_or_explain(cls, pretrained, name, **weights)
                for name, cls in self.text_encoder_classes.items()
            },
            tokenizers={
                self.tokenizer_names[name]: from_pretrained_or_explain(
                    self.tokenizer_class(self.tokenizer_names[name]),
                    pretrained,
                    self.tokenizer_names[name],
                    revision=revision,
                )
                for name in self.text_encoder_classes
            },
            denoiser_name=self.denoiser_name,
        )

    def assemble_pipeline(self, components: Components, **overrides: Any) -> DiffusionPipeline:
        """A pipeline sharing the given modules (no copies)."""
        parts = {
            self.denoiser_name: components.denoiser,
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

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: PromptEmbeddings,
        original_sizes: torch.Tensor | None,
        crops_top_left: torch.Tensor | None,
        target_size: tuple[int, int],
    ) -> torch.Tensor:
        """The denoiser's output for noisy latents (batch, channels, height, width), in the same layout."""
        conditioning = self.unet_conditioning(embeddings, original_sizes, crops_top_left, target_size)
        return denoiser(noisy, timesteps, **conditioning).sample

    def lora_file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft adapter names as this family's diffusers scripts write them (UNet families: diffusers names).
        Where a target has no diffusers name (`proj_in`, `ff.net.2`), every key keeps peft's: the loaders read
        either naming, but a file mixing both loads only the peft-named adapters."""
        from diffusers.utils import convert_state_dict_to_diffusers

        converted = convert_state_dict_to_diffusers(state)
        if any(".lora_A." in k or ".lora_B." in k for k in converted):
            return state
        return converted

    def save_lora_weights(
        self,
        folder: Path,
        denoiser_layers: dict[str, torch.Tensor],
        text_encoder_layers: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        """Write the adapters where `pipe.load_lora_weights(folder)` finds them; text encoders by pipeline name."""
        self.pipeline_class.save_lora_weights(
            folder,
            **{f"{self.denoiser_name}_lora_layers": denoiser_layers},
            **{f"{name}_lora_layers": layers for name, layers in text_encoder_layers.items()},
            safe_serialization=True,
        )

    def textual_inversion_files(self, placeholder: str, vectors: dict[str, torch.Tensor]) -> dict[str, dict]:
        """File name -> tensors of the learned embeddings (one vector per text encoder, by pipeline name)."""
        (vector,) = vectors.values()
        return {TEXTUAL_INVERSION_WEIGHTS: {placeholder: vector}}

    def load_textual_inversion(self, pipe: DiffusionPipeline, folder: Path) -> None:
        pipe.load_textual_inversion(str(folder), weight_name=TEXTUAL_INVERSION_WEIGHTS)
