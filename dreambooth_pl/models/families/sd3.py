"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching on 16-channel latents.

Conditioning is `StableDiffusion3Pipeline.encode_prompt`'s: both CLIP encoders' penultimate hidden states
side by side, zero-padded to T5's width and followed by T5's tokens in one sequence; the pooled vector is
both CLIPs' projected pooled outputs side by side.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5Tokenizer

from dreambooth_pl.models.families.base import PromptEmbeddings
from dreambooth_pl.models.families.flux import FlowMatchingFamily, clip_ids, t5_hidden_states


class StableDiffusion3(FlowMatchingFamily):
    pipeline_class = StableDiffusion3Pipeline
    denoiser_class = SD3Transformer2DModel
    text_encoder_classes = {
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
    }
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
    tokenizer_classes = {"tokenizer_3": T5Tokenizer}
    trainable_text_encoder_names = ["text_encoder", "text_encoder_2"]

    def __init__(self, max_sequence_length: int = 256):
        super().__init__(max_sequence_length)

    def encode_prompts(self, tokenizers, text_encoders, prompts):
        states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            encoder = text_encoders[name]
            out = encoder(
                clip_ids(tokenizers[self.tokenizer_names[name]], prompts, encoder.device), output_hidden_states=True
            )
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5 = t5_hidden_states(
            tokenizers["tokenizer_3"], text_encoders["text_encoder_3"], prompts, self.max_sequence_length
        )
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeddings(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def predict(self, denoiser, noisy, timesteps, embeddings, original_sizes, crops_top_left, target_size):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeddings.hidden_states,
            pooled_projections=embeddings.pooled,
        ).sample
