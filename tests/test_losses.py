"""The DreamBooth loss against hand computations of its formula."""

from __future__ import annotations

import math

import pytest
import torch

from dreambooth_pl.models.objectives import prediction_target, snr_weights
from dreambooth_pl.models.pipelines import load_components
from dreambooth_pl.training.losses import dreambooth_loss, offset_noise
from dreambooth_pl.training.module import DreamBoothModule

ALPHAS = torch.linspace(0.999, 0.01, 1000)


def hand_mse(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [((x - y) ** 2).mean().item() for x, y in zip(a, b)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("with_prior", [True, False])
def test_loss_matches_hand_computation(prediction_type, gamma, with_prior):
    g = torch.Generator().manual_seed(0)
    n = 4 if with_prior else 2
    latents, noise, pred = (torch.randn(n, 4, 8, 8, generator=g) for _ in range(3))
    timesteps = torch.tensor([10, 500, 900, 250][:n])  # instance and prior halves differ on purpose
    is_prior = torch.tensor([False, False, True, True][:n])
    lam = 0.7

    target = prediction_target(prediction_type, ALPHAS, latents, noise, timesteps)
    weights = None if gamma is None else snr_weights(ALPHAS, timesteps, gamma, prediction_type)
    loss = dreambooth_loss(pred, target, is_prior, lam, weights)

    expected_target = []
    for i, t in enumerate(timesteps.tolist()):
        a = ALPHAS[t].item()
        eps_target = noise[i]
        v_target = math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i]
        expected_target.append(eps_target if prediction_type == "epsilon" else v_target)
    mse = hand_mse(pred, expected_target)
    if gamma is not None:
        for i, t in enumerate(timesteps.tolist()):
            s = ALPHAS[t].item() / (1 - ALPHAS[t].item())
            mse[i] *= min(s, gamma) / (s if prediction_type == "epsilon" else s + 1)
    instance = sum(mse[:2]) / 2
    assert loss.instance.item() == pytest.approx(instance, rel=1e-5)
    if with_prior:
        prior = sum(mse[2:]) / 2
        assert loss.prior.item() == pytest.approx(prior, rel=1e-5)
        assert loss.total.item() == pytest.approx(instance + lam * prior, rel=1e-5)
    else:
        assert loss.prior is None
        assert loss.total.item() == pytest.approx(instance, rel=1e-5)


def test_snr_weights_clip_only_high_snr():
    timesteps = torch.tensor([0, 999])
    w = snr_weights(ALPHAS, timesteps, 5.0, "epsilon")
    high_snr = ALPHAS[0] / (1 - ALPHAS[0])
    assert w[0].item() == pytest.approx(5.0 / high_snr.item(), rel=1e-5)  # clipped
    assert w[1].item() == pytest.approx(1.0)  # low SNR: unweighted


def test_offset_noise_adds_a_constant_per_channel():
    noise = torch.zeros(2, 4, 8, 8)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shifted[:, :, :1, :1].expand_as(shifted))
    assert shifted.abs().max() > 0
    assert offset_noise(noise, 0.0) is noise


def fixed_batch() -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Two instance and two prior samples with fixed pixels, noise and timesteps."""
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
        "prompts": ["a sks teapot"] * 2 + ["a teapot"] * 2,
        "is_prior": torch.tensor([False, False, True, True]),
    }
    return batch, torch.randn(4, 4, 16, 16, generator=g), torch.tensor([5, 400, 800, 999])


def test_module_loss_equals_formula(tiny_pretrained):
    """The module's loss = instance MSE + lambda * prior MSE on the same forward pass."""
    module = DreamBoothModule(tiny_pretrained, optimizer=torch.optim.AdamW, prior_weight=0.5)
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
    assert loss.instance.item() == pytest.approx((mse[0] + mse[1]) / 2, rel=1e-4)
    assert loss.prior.item() == pytest.approx((mse[2] + mse[3]) / 2, rel=1e-4)
    assert loss.total.item() == pytest.approx(loss.instance.item() + 0.5 * loss.prior.item(), rel=1e-6)
