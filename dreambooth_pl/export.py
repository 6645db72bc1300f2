"""Writing a run's products: whole folders appear at once, with the run's info beside the weights."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusers import StableDiffusionPipeline

RUN_INFO = "dreambooth.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TEXTUAL_INVERSION_WEIGHTS = "learned_embeds.safetensors"


def write_dir_atomically(
    target: str | os.PathLike, write: Callable[[Path], None], run_info: dict | None = None
) -> Path:
    """Fill a sibling temporary folder, then rename it over `target`: a crash never leaves half a model."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        if run_info is not None:
            (staging / RUN_INFO).write_text(json.dumps(run_info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_pipeline_atomically(
    pipe: StableDiffusionPipeline, target: str | os.PathLike, run_info: dict | None = None
) -> Path:
    return write_dir_atomically(
        target, lambda staging: pipe.save_pretrained(staging, safe_serialization=True), run_info
    )


def read_run_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else {}
