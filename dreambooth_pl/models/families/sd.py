"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden states condition the UNet."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from dreambooth_pl.models.families.base import ModelFamily, PromptEmbeddings


class StableDiffusion(ModelFamily):
    pipeline_class = StableDiffusionPipeline
    text_encoder_classes = {"text_encoder": CLIPTextModel}
    tokenizer_names = {"text_encoder": "tokenizer"}
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompts(self, tokenizers, text_encoders, prompts):
        tokenizer, text_encoder = tokenizers["tokenizer"], text_encoders["text_encoder"]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        return PromptEmbeddings(text_encoder(ids)[0])
