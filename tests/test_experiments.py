"""The paper's experiments as configs, and the three methods in one Table 1."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, needs_dataset
from tests.test_evaluate import QUICK
from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides
from tests.test_training import run_train_py


def sweep_params(experiment: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.eval.enabled and cfg.eval.images_per_prompt == 4
    # the sweep folder and W&B group are named after it, and it ends with its report
    assert cfg.sweep_name == experiment and cfg.hydra.callbacks.report._target_ == "dreambooth_pl.reporting.sweep.SweepReport"
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


@pytest.mark.slow  # a training run of a minute or more: CI runs it (.ci/run)
@needs_dataset
def test_three_methods_make_one_table1(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    tiny = tiny_eval_overrides(tiny_embedding_models(tmp_path / "embedders"))
    args = [
        "-m",
        "method=dreambooth,lora,textual_inversion",
        *FAST,
        "trainer.max_steps=2",
        "export.samples.prompts=[]",
        "eval.enabled=true",
        *tiny,
        *QUICK,
        "eval.images_per_prompt=1",
        "eval.div.enabled=false",  # one image per prompt: no pair for DIV
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    run_train_py(args, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_pl.report", str(sweep)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in csv.DictReader((sweep / "report" / "table1.csv").open()) if r["source"] == "ours"]
    methods = [r["method"] for r in rows if r["row"] != "Real Images"]
    assert sorted(methods) == ["dreambooth", "lora", "textual_inversion"], rows
    assert all(math.isfinite(float(r["dino_mean"])) for r in rows)


def run_toy_sweep(tmp_path, *overrides: str):
    """A toy experiment as a user runs it (train.py -m), cut to a few steps and images; returns its folder."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *overrides,
        "logger=none",
        "trainer.max_steps=2",
        "prior.num_images=2",
        "sampler.num_inference_steps=2",
        "callbacks.samples.every_n_steps=0",
        "validation.enabled=false",
        "export.samples.prompts=[]",
        *QUICK,
        "eval.images_per_prompt=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.toyworld_dir={REPO / 'toyworld'}",
    ]
    run_train_py(args, tmp_path)
    return sweep


@pytest.mark.slow
def test_toy_paper_sweep_reports_every_row_with_the_control_rows(tmp_path):
    """experiment=toy_paper as a user runs it, cut to 1 test subject, 1 seed and a few steps: every toy_row
    trains and is evaluated, then the sweep's end evaluates the control rows (base model, base model +
    attribute words, renderer ground truth and look-alike) and writes the report with paired differences
    and the drift grid."""
    sweep = run_toy_sweep(tmp_path, "experiment=toy_paper", "subject=heldout_teapot", "seed=100")
    report = sweep / "report"
    runs = list(csv.DictReader((report / "runs.csv").open()))
    assert sorted((r["method"], r["prior_weight"], r["class_noun_condition"]) for r in runs) == [
        ("attribute_words", "", "correct"),
        ("base", "", "correct"),
        ("dreambooth", "0.0", "correct"),
        ("dreambooth", "1.0", "correct"),
        ("dreambooth", "1.0", "none"),
        ("dreambooth", "1.0", "wrong"),
        ("lora", "1.0", "correct"),
        ("renderer", "", "correct"),
        ("renderer_lookalike", "", "correct"),
        ("textual_inversion", "0.0", "correct"),
    ]
    control = {
        name: json.loads((sweep / name / "heldout_teapot" / "eval" / "metrics.json").read_text())
        for name in ("attribute_words", "renderer", "renderer_lookalike")
    }
    assert control["attribute_words"]["images"][0]["prompt"] == "a red teapot in the jungle"  # its colour for "sks"
    truth = control["renderer"]
    assert truth["metadata"]["pipeline"] is None and truth["images"][0]["prompt"] == "a sks teapot in the jungle"
    # the subject itself beats a red teapot and its own look-alike drawn in the same places
    assert truth["metrics"]["dino"] > control["attribute_words"]["metrics"]["dino"]
    assert truth["metrics"]["dino"] > control["renderer_lookalike"]["metrics"]["dino"]
    paired = {(r["comparison"], r["metric"]) for r in csv.DictReader((report / "paired.csv").open())}
    control = "Base model + attribute words (toy, no fine-tuning; control)"
    assert (f"DreamBooth (toy, PPL λ=1) − {control}", "dino") in paired
    assert ("DreamBooth (toy, PPL λ=1) − DreamBooth (toy, no PPL)", "pres") in paired
    table1 = {r["row"] for r in csv.DictReader((report / "table1.csv").open()) if r["source"] == "ours"}
    assert "Base model (toy, no fine-tuning; control)" in table1 and "DreamBooth (toy, PPL λ=1)" in table1
    text = (report / "report.md").read_text()
    assert "| *paper* | DreamBooth (Imagen) w/ PPL |" in text and "![language drift](language_drift.png)" in text
    controls = "Base model, Base model + attribute words, Renderer ground truth, Renderer look-alike"
    assert f"6 trained runs and 4 control evaluations ({controls}) of 1 subject, from" in text
    assert "## Table 3" in text and "## Table 4" in text and "left out" not in text  # both axes are swept
    assert "No intervals: each pair of rows shares one subject" in text  # one subject: no 47 "n/a" rows
    assert "- DINO stand-in (DINO, PRES) is partly validated: it passes 1 of its 4 tests of 200 pairs" in text
    drift = Image.open(report / "language_drift.png")
    assert drift.width == 2 * 64  # eval.pres.num_images=2 images of 64 px per row: base, lambda 0, lambda 1


@pytest.mark.slow
def test_toy_closeup_trains_on_closeups_and_scores_against_the_whole_subject(tmp_path):
    """experiment=toy_closeup cut to 1 subject, 1 row and a few steps: the run trains on the close-ups, is
    scored against the subject's whole photos, and the sweep's controls and ceiling are drawn for that subject."""
    sweep = run_toy_sweep(tmp_path, "experiment=toy_closeup", "subject=heldout_can", "toy_row=no_class_noun")
    trained = json.loads((sweep / "0" / "pipeline" / "dreambooth.json").read_text())
    assert trained["instance_dir"] == str(REPO / "toyworld" / "closeups" / "heldout_can")
    assert trained["class_noun"] == ""  # the no-class-noun row: "a sks"
    whole = str(REPO / "toyworld" / "dataset" / "heldout_can")
    scored = json.loads((sweep / "0" / "eval" / "metrics.json").read_text())["metadata"]
    assert scored["real_images_dir"] == trained["real_images_dir"] == whole  # a later re-evaluation reads it too
    truth = json.loads((sweep / "renderer" / "heldout_can" / "eval" / "metrics.json").read_text())
    assert truth["images"][0]["prompt"] == "a sks can in the jungle" and truth["metrics"]["dino"] > 0.5
    runs = list(csv.DictReader((sweep / "report" / "runs.csv").open()))
    assert {r["class_noun_condition"] for r in runs if r["method"] == "dreambooth"} == {"none"}


@pytest.mark.slow
def test_ablation_sweep_evaluates_every_job_and_ends_with_its_report(tmp_path):
    """`python train.py -m ablation=ppl` as a user types it, cut to a few steps and images: both jobs are
    evaluated, the base model too, the report with the drift grid is in the sweep folder, which (and so the
    W&B group) is named after the ablation."""
    args = ["-m", "ablation=ppl", "logger=wandb", "trainer.max_steps=2", "prior.num_images=2"]
    args += ["sampler.num_inference_steps=2", "callbacks.samples.every_n_steps=0", "export.samples.prompts=[]"]
    args += ["validation.enabled=false"]
    args += [*QUICK, "eval.images_per_prompt=2", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run_train_py([*args, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, {"WANDB_MODE": "offline"})
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sweep.name.startswith("ablation_ppl-")
    for job in ("0", "1"):
        assert (sweep / job / "eval" / "metrics.json").is_file()
        assert json.loads((sweep / job / "wandb" / "dreambooth_run.json").read_text())["group"] == sweep.name
    runs = list(csv.DictReader((sweep / "report" / "runs.csv").open()))
    trained = sorted((r["method"], r["prior_weight"]) for r in runs)
    controls = [("attribute_words", ""), ("base", ""), ("renderer", ""), ("renderer_lookalike", "")]  # a toy subject
    assert trained == sorted([*controls, ("dreambooth", "0.0"), ("dreambooth", "1.0")])
    assert (sweep / "report" / "language_drift.png").is_file()
    assert f"[report] {sweep / 'report' / 'report.md'}" in proc.stdout
    # the console summary: every row (trained, then controls) by every metric
    summary = proc.stdout.split("[report] 6 rows x 5 metrics (2 trained runs, 4 control evaluations; means")[1]
    assert "DreamBooth (toy, no PPL)" in summary and "Renderer look-alike (control)" in summary
    assert (proc.stdout + proc.stderr).count("DIV IS NOT LPIPS") <= 1  # once per sweep, not per evaluation
