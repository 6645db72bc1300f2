"""The end product of a run: a diffusers pipeline folder plus what is needed to prompt it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dreambooth_pl.models import save_pipeline_atomically
from dreambooth_pl.module import DreamBoothModule

RUN_INFO = "dreambooth.json"


def export_pipeline(module: DreamBoothModule, target: str | os.PathLike, run_info: dict) -> Path:
    """Save the fine-tuned pipeline with `run_info` (identifier, class noun, prompts) beside the weights."""
    return save_pipeline_atomically(module.pipeline(), target, {RUN_INFO: json.dumps(run_info, indent=2)})


def read_run_info(pipeline_dir: str | os.PathLike) -> dict:
    path = Path(pipeline_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else {}
