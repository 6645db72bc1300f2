"""The DreamBooth objective: instance reconstruction plus lambda times prior preservation.

Everything is computed per sample first, so SNR weighting uses each sample's own timestep whether it
belongs to the instance half or the prior half of the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DreamBoothLoss(NamedTuple):
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a per-channel constant so the model can learn very dark or bright images."""
    if offset == 0:
        return noise
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=noise.device)
    return noise + offset * shift.to(noise.dtype)


def prediction_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    raise ValueError(f"Unsupported scheduler prediction_type {prediction_type!r} (epsilon or v_prediction).")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), one per sample."""
    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    is_prior: torch.Tensor,
    prior_weight: float,
    sample_weights: torch.Tensor | None = None,
) -> DreamBoothLoss:
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    instance = per_sample[~is_prior].mean()
    if not is_prior.any():
        return DreamBoothLoss(instance, instance, None)
    prior = per_sample[is_prior].mean()
    return DreamBoothLoss(instance + prior_weight * prior, instance, prior)


def _per_sample(schedule: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = schedule.to(device=like.device, dtype=torch.float32)[timesteps]
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)
