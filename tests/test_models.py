"""Random-weight pipelines are built once, saved in diffusers layout and loaded like real models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreambooth_pl.models.hub import ModelNotReachable, check_pretrained
from dreambooth_pl.models.pipelines import build_random_pipeline, load_components
from tests.conftest import CLIP_BPE, FAST, compose_train, needs_clip_bpe


def test_tiny_model_is_a_diffusers_pipeline(tiny_pretrained):
    folder = Path(tiny_pretrained)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert list(folder.glob("unet/*.safetensors")), "weights must be safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pretrained, safety_checker=None, requires_safety_checker=False)
    image = pipe(
        "a sks teapot", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    parts = load_components(tiny_pretrained)
    assert parts.tokenizer("a sks teapot", add_special_tokens=False).input_ids.__len__() == 3
    assert sum(p.numel() for p in parts.unet.parameters()) < 5_000_000


def test_build_is_cached_and_keyed_by_config(tmp_path, cache_dir):
    cfg = compose_train(FAST, tmp_path, cache_dir)
    spec = {k: v for k, v in cfg.model.pretrained.items() if k != "_target_"}
    spec["cache_dir"] = str(tmp_path / "models")
    first = build_random_pipeline(**spec)
    stamp = os.stat(Path(first) / "model_index.json").st_mtime_ns
    assert build_random_pipeline(**spec) == first
    assert os.stat(Path(first) / "model_index.json").st_mtime_ns == stamp  # not rebuilt
    spec["seed"] = 1
    assert build_random_pipeline(**spec) != first
    assert [
        p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".") and p.is_dir()
    ] == []  # no staging


@needs_clip_bpe
def test_tiny_model_with_the_real_clip_vocabulary(tmp_path, cache_dir):
    cfg = compose_train([*FAST, f"model.pretrained.tokenizer.clip_bpe={CLIP_BPE}"], tmp_path, cache_dir)
    spec = {k: v for k, v in cfg.model.pretrained.items() if k != "_target_"}
    parts = load_components(build_random_pipeline(**spec))
    assert parts.text_encoder.config.vocab_size == 49408
    assert parts.tokenizer("a sks dog").input_ids == [49406, 320, 48136, 1929, 49407]


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotReachable, match="not a diffusers pipeline folder.*model_index.json"):
        check_pretrained(str(tmp_path))
    with pytest.raises(ModelNotReachable, match="no such folder"):
        check_pretrained(str(tmp_path / "nope" / "deeper"))


def test_unreachable_hub_id_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotReachable, match="model.pretrained=/path"):
        load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")
