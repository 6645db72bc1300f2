"""Stable Diffusion XL: two CLIP text encoders and per-image size/crop micro-conditioning.

The UNet's cross-attention context is both encoders' penultimate hidden states side by side; its added
conditioning is the second encoder's pooled (projected) output and six "time ids" per image: the image's
original (height, width), the top-left corner of its crop and the target (height, width). They are each
image's own (instance and class images alike): prior preservation with another image's ids teaches the
model wrong crops (diffusers #6967, #7239).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_pl.models.families.base import ModelFamily, PromptEmbeddings
from dreambooth_pl.runs.export import TEXTUAL_INVERSION_WEIGHTS

# The second encoder's learned embedding, beside TEXTUAL_INVERSION_WEIGHTS (the first encoder's)
TEXTUAL_INVERSION_WEIGHTS_2 = "learned_embeds_2.safetensors"


class StableDiffusionXL(ModelFamily):
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

    def encode_prompts(self, tokenizers, text_encoders, prompts):
        hidden, pooled = [], None
        for name, text_encoder in text_encoders.items():
            tokenizer = tokenizers[self.tokenizer_names[name]]
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(text_encoder.device)
            output = text_encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's: its projected pooled output (text_embeds)
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    def unet_conditioning(self, embeddings, original_sizes, crops_top_left, target_size):
        if original_sizes is None or crops_top_left is None:
            raise ValueError("SDXL conditions on each image's original size and crop: the batch has neither.")
        target = torch.tensor(target_size, device=original_sizes.device).expand(len(original_sizes), 2)
        time_ids = torch.cat([original_sizes, crops_top_left, target], dim=1)
        return {
            "encoder_hidden_states": embeddings.hidden_states,
            "added_cond_kwargs": {
                "text_embeds": embeddings.pooled,
                "time_ids": time_ids.to(embeddings.hidden_states),
            },
        }

    def textual_inversion_files(self, placeholder, vectors):
        """One file per encoder, each what `load_textual_inversion` reads for that encoder."""
        return {
            TEXTUAL_INVERSION_WEIGHTS: {placeholder: vectors["text_encoder"]},
            TEXTUAL_INVERSION_WEIGHTS_2: {placeholder: vectors["text_encoder_2"]},
        }

    def load_textual_inversion(self, pipe, folder: Path) -> None:
        pipe.load_textual_inversion(str(folder), weight_name=TEXTUAL_INVERSION_WEIGHTS)
        pipe.load_textual_inversion(
            str(folder),
            weight_name=TEXTUAL_INVERSION_WEIGHTS_2,
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
