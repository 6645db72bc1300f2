"""The model-family seam: the SD-1.x loss is the formula's, checkpoint names are those of the code before the seam."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dreambooth_pl.models.pipelines import load_components
from dreambooth_pl.training.module import DreamBoothModule
from tests.test_losses import fixed_batch, hand_mse

# The checkpoint names of main at 61a2b08 (before the family seam): old checkpoints must still load.
PINNED_SD_STATE_KEYS = "2661c70107f76b0a18c0d0c226585ad9018379020a992d339ffdaa368995f7bf"


def test_sd_loss_and_checkpoint_names_are_unchanged(tiny_pretrained):
    """The SD loss with Min-SNR (gamma 5) and prior preservation, against the formula on a fresh copy of the
    model's parts: MSE(eps prediction, noise) x min(SNR, 5) / SNR per sample, instance + 0.5 prior."""
    module = DreamBoothModule(tiny_pretrained, optimizer=torch.optim.AdamW, prior_weight=0.5, snr_gamma=5.0)
    module.eval()
    batch, noise, timesteps = fixed_batch()
    torch.manual_seed(3)
    loss = module.compute_loss(batch, noise=noise, timesteps=timesteps)

    parts = load_components(tiny_pretrained)
    torch.manual_seed(3)
    with torch.no_grad():
        latents = parts.vae.encode(batch["pixel_values"]).latent_dist.sample() * parts.vae.config.scaling_factor
        ids = parts.tokenizer(batch["prompts"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = parts.unet(noisy, timesteps, parts.text_encoder(ids)[0]).sample
    mse = hand_mse(pred, noise)
    for i, t in enumerate(timesteps.tolist()):
        alpha = parts.noise_scheduler.alphas_cumprod[t].item()
        snr = alpha / (1 - alpha)
        mse[i] *= min(snr, 5.0) / snr
    instance, prior = (mse[0] + mse[1]) / 2, (mse[2] + mse[3]) / 2
    assert loss.instance.item() == pytest.approx(instance, rel=1e-4)
    assert loss.prior.item() == pytest.approx(prior, rel=1e-4)
    assert loss.total.item() == pytest.approx(instance + 0.5 * prior, rel=1e-4)
    keys = hashlib.sha256("\n".join(module.state_dict().keys()).encode()).hexdigest()
    assert keys == PINNED_SD_STATE_KEYS
