"""Every trainer preset and method option a user can pick, end to end on the CPU.

The GPU presets broke the first time someone ran them (a bf16 export that could not render), because every
test ran fp32 with default options. Here each preset that a CPU can run trains, exports, renders its final
samples and is reloaded with diffusers in fp32, bf16 and fp16; the export must hold the base model's own
frozen weights and inference scheduler, never the rounded copies or the DDPM scheduler used in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.training.job import train
from dreambooth_pl.util.config import resolve_path
from tests.conftest import DREAMBOOTH_ROOT, FAST, compose_train, needs_dataset
from tests.test_distributed import train_py

pytestmark = needs_dataset

ON_CPU = ["trainer.accelerator=cpu"]  # the GPU presets' own settings (precision, strategy), on this CPU
PRESETS = {
    "default": [],
    "cpu": ["trainer=cpu"],
    "gpu (bf16-mixed)": ["trainer=gpu", *ON_CPU],
    "16-mixed": ["trainer=gpu", *ON_CPU, "trainer.precision=16-mixed"],
}
METHODS = {
    "dreambooth + text encoder": ["method.train_text_encoder=true"],
    "lora rank 4 alpha 8 + text encoder, merged": [
        "method=lora",
        "method.alpha=8",
        "method.train_text_encoder=true",
        "method.export_merged=true",
    ],
    "textual_inversion": ["method=textual_inversion"],
}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def renders_in_every_dtype(export: str) -> None:
    """The export loads and renders finite images under fp32, bf16 and fp16 loading."""
    for dtype in (None, "bfloat16", "float16"):
        pipe = load_pipeline(export, device="cpu", dtype=dtype)
        image = pipe("a sks teapot", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all(), dtype


def check_export_keeps_the_base(pipeline: Path, base: Path, learned: set[str]) -> None:
    """Frozen parts equal the base bit for bit, in its dtype; the base's inference scheduler is kept."""
    for part in ("vae", "text_encoder", "unet"):
        exported, original = weights(pipeline / part), weights(base / part)
        assert {k: v.dtype for k, v in exported.items()} == {k: v.dtype for k, v in original.items()}, part
        if part not in learned:
            assert all(torch.equal(exported[k], original[k]) for k in original), part
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler == json.loads((base / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_trainer_preset_end_to_end(preset, tmp_path, cache_dir):
    cfg = compose_train([*FAST, *PRESETS[preset]], tmp_path, cache_dir)
    result = train(cfg)
    assert result["global_step"] == cfg.trainer.max_steps
    assert Path(result["samples"]).exists()  # final samples rendered from the export
    check_export_keeps_the_base(Path(result["pipeline"]), Path(resolve_path(cfg.model.pretrained)), {"unet"})
    renders_in_every_dtype(result["pipeline"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_bf16_mixed(method, tmp_path, cache_dir):
    overrides = [*FAST, *PRESETS["gpu (bf16-mixed)"], *METHODS[method], "export.samples.prompts=[]"]
    cfg = compose_train(overrides, tmp_path, cache_dir)
    result = train(cfg)
    base = Path(resolve_path(cfg.model.pretrained))
    if method.startswith("dreambooth"):
        check_export_keeps_the_base(Path(result["pipeline"]), base, {"unet", "text_encoder"})
    if method.startswith("lora"):
        check_export_keeps_the_base(tmp_path / "pipeline", base, {"unet", "text_encoder"})
        renders_in_every_dtype(str(tmp_path / "pipeline"))
    renders_in_every_dtype(result["pipeline"])


@pytest.mark.slow
def test_ddp_preset_with_its_bf16_on_two_cpu_processes(tmp_path, cache_dir):
    """trainer=ddp as shipped (bf16-mixed, DDP strategy), on 2 gloo processes: rank 0 exports and renders."""
    run_dir = tmp_path / "run"
    train_py(
        [
            *FAST,
            "trainer=ddp",
            *ON_CPU,
            "trainer.devices=2",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache_dir}",
            f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        ],
        cwd=tmp_path,
    )
    assert (run_dir / "final_samples" / "grid.png").exists()
    base = Path(resolve_path(compose_train(FAST, tmp_path, cache_dir).model.pretrained))
    check_export_keeps_the_base(run_dir / "pipeline", base, {"unet"})
