"""Caches for frozen encoders: same training, less work."""

from __future__ import annotations

import pytest
import torch

from dreambooth_pl.models.pipelines import load_components
from dreambooth_pl.training.job import train
from dreambooth_pl.util.config import resolve_path
from tests.conftest import FAST, compose_train, needs_dataset

pytestmark = needs_dataset


def run(tmp_path, cache_dir, overrides):
    cfg = compose_train([*FAST, "trainer.max_steps=12", "export.enabled=false", *overrides], tmp_path, cache_dir)
    module = train(cfg)["module"]
    return module, [p.detach().clone() for p in module.unet.parameters()]


def test_caches_change_nothing_but_the_work(tmp_path, cache_dir):
    off, off_weights = run(
        tmp_path / "off", cache_dir, ["module.cache_latents=false", "module.cache_text_embeddings=false"]
    )
    on, on_weights = run(tmp_path / "on", cache_dir, ["data.random_flip=true"])
    assert not off._latent_cache and not off._text_cache
    # 5 teapot photos and 4 class images, each seen flipped and unflipped at most: at most 18 views.
    assert 9 <= len(on._latent_cache) <= 18
    assert {k.split(":")[0] for k in on._latent_cache} == {"instance", "class"}
    assert set(on._text_cache) == {"a sks teapot", "a teapot"}
    # Same data, noise and steps without caches: the weights agree up to float noise (encoding one view at
    # a time rounds differently from a batch), small against how far 12 steps moved them.
    _, uncached = run(
        tmp_path / "off_flip",
        cache_dir,
        ["data.random_flip=true", "module.cache_latents=false", "module.cache_text_embeddings=false"],
    )
    base = compose_train(FAST, tmp_path / "base", cache_dir)
    initial = list(load_components(resolve_path(base.model.pretrained)).unet.parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(on_weights, initial, strict=True))
    worst = max((a - b).abs().max().item() for a, b in zip(on_weights, uncached, strict=True))
    print(f"weights moved {moved:.2e}; cached vs uncached differ by {worst:.2e}")
    assert worst < 0.05 * moved
    assert len(off_weights) == len(initial)


@pytest.mark.slow  # a training run of a minute or more: CI runs it (.ci/run)
def test_random_crops_are_not_cached(tmp_path, cache_dir):
    module, _ = run(tmp_path, cache_dir, ["data.center_crop=false"])
    assert not module._latent_cache
    assert len(module._text_cache) == 2


def test_text_cache_is_off_while_the_text_encoder_learns(tmp_path, cache_dir):
    module, _ = run(tmp_path, cache_dir, ["method.train_text_encoder=true"])
    assert not module._text_cache
    assert module.text_encoder_learns
    assert torch.is_grad_enabled()
