"""FLUX.1: a rectified-flow transformer on packed latents, conditioned on T5 and a pooled CLIP vector.

The transformer sees 2x2 patches of 16-channel latents as tokens (`FluxPipeline._pack_latents`), each
with its (0, row, column) position id; the text tokens are T5's last hidden states (position ids zero),
and CLIP's pooled output joins the timestep embedding. FLUX.1-dev is guidance-distilled: its transformer
takes the guidance scale as an input, fed at training as diffusers' train_dreambooth_lora_flux.py does
(`guidance_scale`, 3.5 by default). Latents are (z - shift_factor) x scaling_factor (the module's VAE step).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel, T5Tokenizer

from dreambooth_pl.models.families.base import ModelFamily, PromptEmbeddings
from dreambooth_pl.models.objectives import FlowMatching

NO_TEXTUAL_INVERSION = (
    "method=textual_inversion is not offered for {family}: its pipeline conditions every image token on "
    "T5's hidden states and uses CLIP only as one pooled vector, so a token learned in the CLIP vocabulary "
    "alone (what load_textual_inversion loads) barely moves the image; learning T5 embeddings too is the "
    "advanced FLUX script's pivotal tuning, not done here. Use method=lora or method=dreambooth."
)

NO_KOHYA = (
    "method.export_kohya=true is offered for SD and SDXL, whose UNet names diffusers' kohya converter maps "
    "(the SDXL scripts' --output_kohya_format); {family}'s transformer names are not mapped by it. Its "
    "pytorch_lora_weights.safetensors loads in diffusers and ComfyUI as written: unset the option."
)

NO_FSDP = (
    "trainer=fsdp is refused for {family}: it wraps the whole module as one FSDP unit (fp32), which gathers "
    "the whole transformer and T5 on every GPU at every step, so it saves nothing where these models need "
    "it, and no per-block wrap is implemented for their blocks. Use trainer=gpu with method=lora "
    "(module.gradient_checkpointing, module.quantize_base=nf4, 8-bit AdamW: docs/methods.md), or trainer=ddp."
)


def t5_hidden_states(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """T5's last hidden states for prompts padded to `max_sequence_length`, as the pipelines encode them."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def clip_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


class FlowMatchingFamily(ModelFamily):
    """What FLUX.1 and SD3 share: a transformer trained by flow matching, a T5 encoder (frozen in the
    diffusers scripts, so `train_text_encoder` trains the CLIP ones), no Textual Inversion."""

    denoiser_name = "transformer"
    noise_scheduler_class = FlowMatchEulerDiscreteScheduler

    def __init__(self, max_sequence_length: int = 512):
        self.max_sequence_length = max_sequence_length

    @property
    def textual_inversion_refusal(self) -> str:
        return NO_TEXTUAL_INVERSION.format(family=type(self).__name__)

    @property
    def kohya_refusal(self) -> str:
        return NO_KOHYA.format(family=type(self).__name__)

    @property
    def fsdp_refusal(self) -> str:
        return NO_FSDP.format(family=type(self).__name__)

    def objective(self, noise_scheduler, snr_gamma: float | None = None, **options):
        if snr_gamma is not None:
            raise ValueError(
                "module.snr_gamma weights eps / v losses by SNR; flow matching weights by "
                "module.objective.weighting_scheme (none, logit_normal, mode, cosmap, sigma_sqrt)."
            )
        return FlowMatching(noise_scheduler, **options)

    def lora_file_keys(self, state):
        return state  # the flux / sd3 scripts write peft's names; their pipelines' loaders read them


class Flux(FlowMatchingFamily):
    pipeline_class = FluxPipeline
    denoiser_class = FluxTransformer2DModel
    text_encoder_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    tokenizer_classes = {"tokenizer_2": T5Tokenizer}
    trainable_text_encoder_names = ["text_encoder"]

    def __init__(self, guidance_scale: float = 3.5, max_sequence_length: int = 512):
        super().__init__(max_sequence_length)
        self.guidance_scale = guidance_scale

    def encode_prompts(self, tokenizers, text_encoders, prompts):
        clip = text_encoders["text_encoder"]
        pooled = clip(clip_ids(tokenizers["tokenizer"], prompts, clip.device), output_hidden_states=False).pooler_output
        hidden = t5_hidden_states(
            tokenizers["tokenizer_2"], text_encoders["text_encoder_2"], prompts, self.max_sequence_length
        )
        return PromptEmbeddings(hidden, pooled)

    def predict(self, denoiser, noisy, timesteps, embeddings, original_sizes, crops_top_left, target_size):
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(embeddings.hidden_states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=noisy.device)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # the transformer scales by 1000 itself
            guidance=guidance,
            pooled_projections=embeddings.pooled,
            encoder_hidden_states=embeddings.hidden_states,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        # unpack: tokens of 2x2 patches back to (batch, channels, height, width)
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)
