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
    assert not run.exists()


def wandb_line(output: str) -> str:
    """The closing message's `W&B:` line."""
    return next(line for line in output.splitlines() if line.strip().startswith("W&B: "))


def test_a_toy_run_evaluated_then_trained_further(tmp_path):
    """A real toy run from train.py (W&B offline). Evaluated with only run_dir=: the toy world's prompts and
    readers (conf/model/toy.yaml picks eval=toy); eval=default on it is one line naming the option, before any
    rendering. Trained further: the earlier model's eval/ moves to eval_history/0/, and the closing W&B line
    names both offline folders of the run."""
    run = tmp_path / "run"
    train = [str(REPO / "train.py"), f"hydra.run.dir={run}", "prior.enabled=false", "export.samples.prompts=[]"]
    train += ["callbacks.samples.every_n_steps=0", "validation.enabled=false", "logger.wandb.mode=offline"]
    first = run_module([*train, "trainer.max_steps=2"], tmp_path, expect=0)
    assert len(wandb_line(first).split()) == 4  # W&B: wandb sync <one folder>
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

    further = run_module([*train, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=3"], tmp_path, 0)
    assert not (run / "eval").exists()
    assert json.loads((run / "eval_history" / "0" / "metrics.json").read_text())["metadata"]["steps"] == 2
    assert json.loads((run / "pipeline" / "dreambooth.json").read_text())["steps"] == 3
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and wandb_line(further).split()[3:] == [str(f.resolve()) for f in folders]


def test_a_sweep_job_is_refused_a_folder_another_run_holds(tmp_path):
    """Sweep jobs take their folder's lock like single runs: job 0's folder, held by another process, stops the
    sweep with one line naming the folder and the holder's pid, before any training."""
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    code = "import sys, time; from dreambooth_pl.util.files import ProcessLock; "
    code += "ProcessLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(job / ".run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [str(REPO / "train.py"), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=1,2", "logger=none"]
        args += ["prior.enabled=false", "export.enabled=false", "trainer.max_steps=1", "validation.enabled=false"]
        output = run_module(args, tmp_path, expect=1)
    finally:
        holder.kill()
        holder.wait()
    assert f"{job} is in use by another run (pid {holder.pid})" in output, output
    assert not (job / "checkpoints").exists() and not (tmp_path / "sweep" / "1").exists()
