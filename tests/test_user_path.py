"""What a new user meets first: the DreamBooth dataset's missing photos, `evaluate` on a toy run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run_module(args: list[str], cwd: Path, expect: int) -> str:
    """`python <args>` from the project's environment; its console output, after checking its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, output[-5000:]
    return output


def test_a_missing_dataset_subject_says_how_to_get_the_dataset_before_any_warning(tmp_path):
    """subject=teapot without the dataset: the first warning or error names the missing folder, the option that
    points there and the clone command; nothing about the toy world comes before it, and no run folder is left."""
    empty = tmp_path / "no-dataset"
    empty.mkdir()
    run = tmp_path / "run"
    args = [str(REPO / "train.py"), "subject=teapot", f"paths.dreambooth_root={empty}", f"hydra.run.dir={run}"]
    output = run_module([*args, "logger=none"], tmp_path, expect=1)
    said = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line or "Error" in line]
    assert said, output
    first = said[0]
    assert str(empty / "dataset" / "teapot") in first and "paths.dreambooth_root" in first, output
    assert f"git clone --depth 1 https://github.com/google/dreambooth {empty}" in first, output
    assert "DREAMBOOTH_ROOT" in first and "Traceback" not in output
    assert "not from the toy world" not in output


def test_evaluate_takes_a_toy_runs_evaluation_from_its_model_and_names_a_wrong_eval(tmp_path):
    """A real toy run from train.py, evaluated with only run_dir=: the toy world's prompts and readers (conf/
    model/toy.yaml picks eval=toy); eval=default on it is one line naming the option, before any rendering."""
    run = tmp_path / "run"
    train = [str(REPO / "train.py"), f"hydra.run.dir={run}", "logger=none", "trainer.max_steps=2"]
    train += ["prior.enabled=false", "export.samples.prompts=[]", "callbacks.samples.every_n_steps=0"]
    run_module(train, tmp_path, expect=0)
    quick = ["eval.num_prompts=1", "eval.pres.num_images=2", "eval.sampler.num_inference_steps=2", "logger.wandb=null"]
    evaluate = ["-m", "dreambooth_pl.evaluate", f"run_dir={run}", *quick, f"hydra.run.dir={tmp_path / 'log'}"]

    wrong = run_module([*evaluate, "eval=default"], REPO, expect=1)
    errors = [line for line in wrong.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "eval=default" in errors[0] and "model=toy" in errors[0], wrong
    assert "eval=toy" in errors[0] and "Traceback" not in wrong and not (run / "eval").exists()

    run_module(evaluate, REPO, expect=0)
    record = json.loads((run / "eval" / "metrics.json").read_text())
    toyworld = REPO / "toyworld"
    assert Path(record["metadata"]["dino_model"]) == toyworld / "dino"
    assert Path(record["metadata"]["clip_model"]) == toyworld / "clip"
    assert record["metadata"]["model"] == "toy" and record["div_backend"] == "vae"
    assert record["metadata"]["sampler"]["guidance_scale"] == 5.0  # conf/eval/toy.yaml's, not the paper's 7.5
