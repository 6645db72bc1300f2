"""The DreamBooth loss: instance reconstruction plus lambda times prior preservation.

Everything is computed per sample first, so SNR weighting uses each sample's own timestep whether it
belongs to the instance half or the prior half of the batch. What the denoiser is trained to predict, with
which per-sample weights, is the family's objective (models/objectives.py); `dreambooth_loss` combines the
terms the same way for every objective.
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
