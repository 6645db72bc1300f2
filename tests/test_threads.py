"""Every entry point that computes runs on the `cpu_threads` its config sets (docs/speed.md, "Threads")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.threads import use_cpu_threads
from tests.conftest import REPO

TOYWORLD = REPO / "toyworld"
# runs a module as `python -m` does, then says how many threads torch had at its end
OBSERVE = (
    "import runpy, sys, torch\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    print(f'torch threads at the end: {torch.get_num_threads()}')\n"
)


@pytest.mark.parametrize("config", ["train", "evaluate", "generate", "bench"])
def test_every_entry_points_config_uses_one_thread_by_default(config):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose(config, overrides=["generate.pipeline=x"] if config == "generate" else []).cpu_threads == 1


# the toy model's evaluation on one prompt, 2 images and 2 PRES images at 2 sampler steps
QUICK_EVAL = ["model=toy", "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.pres.num_images=2"]
QUICK_EVAL += ["eval.sampler.num_inference_steps=2"]


def quick_evaluation(out: Path) -> list[str]:
    """The toy base model, evaluated as `pipeline=<folder> subject=<name> identifier=sks`."""
    command = [f"pipeline={TOYWORLD / 'pipeline'}", "subject=toy_teapot", "identifier=sks", *QUICK_EVAL]
    return [*command, "logger.wandb=null", f"output_dir={out}", f"hydra.run.dir={out / 'log'}"]


def quick_generation(out: Path) -> list[str]:
    return [
        f"generate.pipeline={TOYWORLD / 'pipeline'}",
        f"generate.output_dir={out / 'generated'}",
        "generate.prompts=['a teapot']",
        "generate.images_per_prompt=1",
        "generate.sampler.num_inference_steps=2",
        "generate.sampler.resolution=64",
    ]


@pytest.mark.parametrize(
    "module, overrides", [("dreambooth_pl.evaluate", quick_evaluation), ("dreambooth_pl.generate", quick_generation)]
)
def test_an_entry_points_process_runs_on_the_configured_threads(module, overrides, tmp_path):
    """The process starts on 1 thread (torch caps OMP_NUM_THREADS at the cores) and is asked for 2: an entry
    point that ignored cpu_threads would end on 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-c", OBSERVE, module, *overrides(tmp_path), "cpu_threads=2"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "torch threads at the end: 2" in proc.stdout, proc.stdout[-2000:]


def test_the_sweeps_control_rows_are_rendered_on_the_configured_threads(tmp_path):
    """The sweep's report evaluates its control rows in the launching process, which may have run no job (a
    launcher that runs them elsewhere): it sets the sweep's threads itself."""
    from dreambooth_pl.reporting.sweep import SweepReport

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("train", overrides=[*QUICK_EVAL, "cpu_threads=2"])
    run = {"subject": "toy_teapot", "identifier": "sks", "class_noun": "teapot"}
    run["real_images_dir"] = str(TOYWORLD / "dataset" / "toy_teapot")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        SweepReport(base_model=str(TOYWORLD / "pipeline")).evaluate_controls(config, tmp_path, [run])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "base" / "toy_teapot" / "eval" / "metrics.json").is_file()


def test_a_thread_count_below_one_is_refused_by_its_option():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=f"cpu_threads={bad} must be >= 1"):
            use_cpu_threads(bad)
    with pytest.raises(ConfigError, match="threads=0 must be >= 1"):
        use_cpu_threads(0, "cpu", option="threads")
    before = torch.get_num_threads()
    use_cpu_threads(None)  # torch's default: left as it is
    assert torch.get_num_threads() == before
    from dreambooth_pl.evaluation.evaluate import evaluate_from_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("evaluate", overrides=[*quick_evaluation(Path("unused"))[:-1], "cpu_threads=0"])
    with pytest.raises(ConfigError, match="cpu_threads=0 must be >= 1"):  # before the pipeline is read
        evaluate_from_config(config)
