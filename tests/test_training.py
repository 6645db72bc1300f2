"""Training for real on the tiny model: end to end, learning, prior preservation, logging, resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreambooth_pl.training.data import collate
from dreambooth_pl.training.job import train
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.util.config import resolve_path
from dreambooth_pl.util.images import ImageTransform, list_images, load_rgb
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset
from tests.wandb_records import history_rows

pytestmark = needs_dataset
TEAPOT = DREAMBOOTH_ROOT / "dataset" / "teapot"


def run_train_py(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_train_py_end_to_end(tmp_path, cache_dir):
    """The real entry point: class images, training, checkpoints, logs, export, samples, reload."""
    run_dir = tmp_path / "run"
    run_train_py(
        [
            *FAST,
            "logger=csv",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.every_n_train_steps=3",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        ],
        cwd=tmp_path,
    )

    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/instance_loss", "train/prior_loss", "train/lr"} <= logged
    assert (run_dir / "final_samples" / "grid.png").exists()
    assert len(list((cache_dir / "class_images").glob("a_teapot-*/*.png"))) >= 4

    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    image = pipe("a sks teapot in the snow", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)

    generated = tmp_path / "generated"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreambooth_pl.generate",
            f"generate.pipeline={run_dir / 'pipeline'}",
            f"generate.output_dir={generated}",
            "generate.images_per_prompt=2",
            "generate.sampler.resolution=64",
            "generate.sampler.num_inference_steps=2",
            "generate.prompts=['a {identifier} {class_noun} on the moon']",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (generated / "prompts.txt").read_text() == "a sks teapot on the moon\n"
    assert sorted(p.name for p in generated.glob("p*.png")) == ["p00_00.png", "p00_01.png"]


def fixed_probe(pretrained: str, prompt: str, images: list) -> float:
    """Mean loss of a model on fixed images, noise and timesteps: comparable across models."""
    module = DreamBoothModule(pretrained, optimizer=torch.optim.AdamW).eval()
    transform = ImageTransform(64)
    batch = collate([{"instance_pixels": transform(im), "instance_prompt": prompt} for im in images])
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(len(images), 4, 16, 16, generator=generator)
            torch.manual_seed(t)
            losses.append(module.compute_loss(batch, noise, torch.full((len(images),), t)).instance.item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A 250-step run on the teapot (prior preservation is tested on the toy world's pretrained model)."""
    cfg = compose_train([*FAST, "trainer.max_steps=250", "prior.num_images=8", "export.samples.prompts=[]"],
                        tmp_path_factory.mktemp("trained"), cache_dir)  # fmt: skip
    return {"base": resolve_path(cfg.model.pretrained), **train(cfg)}


@pytest.mark.slow
def test_training_lowers_the_instance_loss(trained):
    images = [load_rgb(p) for p in list_images(TEAPOT)]
    before = fixed_probe(trained["base"], "a sks teapot", images)
    after = fixed_probe(trained["pipeline"], "a sks teapot", images)
    print(f"instance loss on fixed noise: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_train_py(
        [
            *FAST,
            "logger=wandb",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        ],
        cwd=tmp_path,
        env_extra={"HOME": str(tmp_path), "WANDB_MODE": ""},
    )
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = history_rows(run_files[0])
    losses = [r["train/instance_loss"] for r in rows if "train/instance_loss" in r]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)
    assert any("train/prior_loss" in r for r in rows) and any("train/lr" in r for r in rows)
    assert any(r.get("samples/_type") == "images/separated" for r in rows)  # the final sample grid


def test_resume_continues_from_the_checkpoint(tmp_path, cache_dir):
    first = compose_train(
        [*FAST, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2", "export.enabled=false"],
        tmp_path / "a",
        cache_dir,
    )
    train(first)
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] == 4
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in state["state_dict"])  # frozen: not saved
    resumed = compose_train([*FAST, "trainer.max_steps=6", f"ckpt_path={checkpoint}"], tmp_path / "b", cache_dir)
    assert train(resumed)["global_step"] == 6
