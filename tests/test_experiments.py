"""The paper's experiments as configs, and the three methods in one Table 1."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir

from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, needs_dataset
from tests.test_evaluate import QUICK
from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides


def sweep_params(experiment: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.eval.enabled and cfg.eval.images_per_prompt == 4
    return {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_paper_experiments_sweep_the_documented_grids():
    table1 = sweep_params("paper_table1")
    assert table1["method"] == ["dreambooth", "textual_inversion"] and len(set(table1["subject"])) == 30
    table3 = sweep_params("paper_table3")
    assert table3["prior.weight"] == ["0.0", "1.0"] and len(set(table3["subject"])) == 15
    table4 = sweep_params("paper_table4")
    assert table4["class_noun"] == ["correct", "none", "wrong"] and len(set(table4["subject"])) == 5
    subjects = {p.stem for p in (REPO / "conf" / "subject").glob("*.yaml")}
    assert set(table1["subject"]) | set(table3["subject"]) | set(table4["subject"]) <= subjects


@needs_dataset
def test_three_methods_make_one_table1(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    tiny = tiny_eval_overrides(tiny_embedding_models(tmp_path / "embedders"))
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "method=dreambooth,lora,textual_inversion",
        *FAST,
        "trainer.max_steps=2",
        "export.samples.prompts=[]",
        "eval.enabled=true",
        *tiny,
        *QUICK,
        "eval.images_per_prompt=1",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_pl.report", str(sweep)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in csv.DictReader((sweep / "report" / "table1.csv").open()) if r["source"] == "ours"]
    methods = [r["method"] for r in rows if r["row"] != "Real Images"]
    assert sorted(methods) == ["dreambooth", "lora", "textual_inversion"], rows
    assert all(-1 <= float(r["dino_mean"]) <= 1 for r in rows)
