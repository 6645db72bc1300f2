"""Shared fixtures: Hydra composition of the real configs with the tiny model, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DREAMBOOTH_ROOT = SHARED / "dreambooth"
CLIP_BPE = SHARED / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"

needs_dataset = pytest.mark.skipif(
    not (DREAMBOOTH_ROOT / "dataset").is_dir(), reason=f"DreamBooth dataset not present at {DREAMBOOTH_ROOT}"
)

# A fast but complete run: a dataset subject, a few class images, few sampler steps, no periodic grids.
FAST = [
    "model=tiny",
    "subject=teapot",
    "logger=none",
    "trainer.max_steps=4",
    "prior.num_images=4",
    "sampler.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "export.samples.images_per_prompt=1",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session: the tiny model is built once and class images are shared."""
    return tmp_path_factory.mktemp("cache")


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as `python train.py` would, with test paths."""
    paths = [
        f"paths.output_dir={output_dir}",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*paths, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def tiny_pretrained(cache_dir) -> str:
    """The tiny model of conf/model/tiny.yaml, built and saved in diffusers layout."""
    from dreambooth_pl.config_utils import resolve_path

    cfg = compose_train(FAST, cache_dir / "unused", cache_dir)
    return resolve_path(cfg.model.pretrained)
