"""The model-family seam: SD-1.x numbers and checkpoint names are those of the code before the seam."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dreambooth_pl.training.module import DreamBoothModule
from tests.test_losses import fixed_batch

# Computed on main at 61a2b08 (before the family seam) with this exact batch, noise and timesteps.
PINNED_SD_LOSS = {"instance": 0.5752509832382202, "prior": 1.150206208229065, "total": 1.1503541469573975}
PINNED_SD_STATE_KEYS = "2661c70107f76b0a18c0d0c226585ad9018379020a992d339ffdaa368995f7bf"


def test_sd_loss_and_checkpoint_names_are_unchanged(tiny_pretrained):
    module = DreamBoothModule(tiny_pretrained, optimizer=torch.optim.AdamW, prior_weight=0.5, snr_gamma=5.0)
    module.eval()
    batch, noise, timesteps = fixed_batch()
    torch.manual_seed(3)
    loss = module.compute_loss(batch, noise=noise, timesteps=timesteps)
    assert loss.instance.item() == pytest.approx(PINNED_SD_LOSS["instance"], rel=1e-6)
    assert loss.prior.item() == pytest.approx(PINNED_SD_LOSS["prior"], rel=1e-6)
    assert loss.total.item() == pytest.approx(PINNED_SD_LOSS["total"], rel=1e-6)
    keys = hashlib.sha256("\n".join(module.state_dict().keys()).encode()).hexdigest()
    assert keys == PINNED_SD_STATE_KEYS
