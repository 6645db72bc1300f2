"""The benchmark runs every variant and reports figures (it measures; it asserts no speed)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from dreambooth_pl.bench import run_bench, variant_config
from tests.conftest import DREAMBOOTH_ROOT, REPO, needs_dataset


def compose_bench(overrides, tmp_path, cache_dir):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "bench",
            overrides=[
                f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={cache_dir}",
                f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
                *overrides,
            ],
        )


def test_gpu_suite_composes_with_sd15_sized_model(tmp_path):
    cfg = compose_bench(["bench=gpu", "model=sd15_random", "trainer=gpu"], tmp_path, tmp_path)
    assert cfg.model.pretrained.unet.block_out_channels == [320, 640, 1280, 1280]
    eight_bit = variant_config(cfg, cfg.bench.variants["bf16 + caches + 8-bit AdamW"].overrides)
    assert eight_bit.module.optimizer._target_ == "bitsandbytes.optim.AdamW8bit"
    assert "fused" not in eight_bit.module.optimizer and "foreach" not in eight_bit.module.optimizer


@needs_dataset
def test_cpu_bench_reports_every_variant(tmp_path, cache_dir):
    cfg = compose_bench(
        [
            "subject=teapot",
            "bench.steps=3",
            "bench.warmup=1",
            "bench.images=2",
            "prior.num_images=4",
            "sampler.num_inference_steps=2",
        ],
        tmp_path,
        cache_dir,
    )
    keep = ["plain_loop", "trainer", "+ gradient checkpointing"]  # a plain loop, the trainer, an option
    cfg.bench.variants = {name: cfg.bench.variants[name] for name in keep}
    result = run_bench(cfg)
    names = [row["variant"] for row in result["rows"]]
    assert names == list(cfg.bench.variants)
    assert all(row["steps_per_s"] > 0 and row["peak_mib"] > 0 for row in result["rows"])
    assert result["rows"][0]["vs_reference"] == 1.0
    assert result["class_images_per_s"] > 0 and result["eval_images_per_s"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["model"] == "tiny"
    assert "| plain_loop |" in (tmp_path / "bench.md").read_text()


@needs_dataset
@pytest.mark.parametrize("model", ["sdxl_tiny", "flux_tiny"])
def test_bench_runs_on_each_family(model, tmp_path, cache_dir):
    overrides = [f"model={model}", "subject=teapot", "bench.steps=2", "bench.warmup=1", "bench.images=2"]
    cfg = compose_bench([*overrides, "prior.num_images=4", "sampler.num_inference_steps=2"], tmp_path, cache_dir)
    cfg.bench.variants = {name: cfg.bench.variants[name] for name in ("plain_loop", "trainer")}
    result = run_bench(cfg)
    assert result["model"] == model
    assert all(row["steps_per_s"] > 0 for row in result["rows"]) and result["class_images_per_s"] > 0


@needs_dataset
def test_threads_bench_runs_torch_default_then_one_thread(tmp_path, cache_dir):
    """bench=threads: each row trains with its cpu_threads (torch's default row keeps what the process had), and
    no generation figures are made; a run's cpu_threads below 1 is named before any work."""
    import torch

    from dreambooth_pl.training.job import build_parts
    from dreambooth_pl.util.config import ConfigError

    cfg = compose_bench(
        ["bench=threads", "subject=teapot", "bench.steps=2", "bench.warmup=1", "prior.num_images=2"],
        tmp_path,
        cache_dir,
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = run_bench(cfg)
    finally:
        torch.set_num_threads(before)
    assert [(row["variant"], row["threads"]) for row in result["rows"]] == [("torch default", 2), ("1 thread", 1)]
    assert all(row["steps_per_s"] > 0 for row in result["rows"]) and "class_images_per_s" not in result
    assert "| 1 thread | 1 |" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ConfigError, match=r"cpu_threads=0 must be >= 1"):
        build_parts(variant_config(cfg, ["cpu_threads=0"]))
