"""One W&B run per job, evaluation into the run it scores, resume with the run's own config (real wandb, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dreambooth_pl.reporting.dashboard import build_report
from dreambooth_pl.runs.layout import WANDB_RUN
from dreambooth_pl.runs.loggers import server_reachable
from dreambooth_pl.runs.resume import merge_overrides
from dreambooth_pl.util.images import image_grid
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, needs_dataset
from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides
from tests.wandb_records import history_rows, run_summary

# A key, but a server that refuses connections: the W&B fallback must be quick and say so once per run.
UNREACHABLE = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_BASE_URL": "http://127.0.0.1:9"}
# The demo subject (rendered: no dataset under paths.dreambooth_root), so evaluation must find the photos the run
# trained on from the run itself, not from the dataset folder.
TRAIN = [*FAST, "subject=demo", "logger=wandb", "trainer.max_steps=3", "trainer.log_every_n_steps=1"]
TRAIN += ["prior.num_images=2", "callbacks.samples.every_n_steps=0"]


def run(command: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(cwd), **UNREACHABLE}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def wandb_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run folder of a training run, oldest first, with what its run file holds."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    return [{**run_summary(f / f"run-{f.name.split('-')[-1]}.wandb"), "folder": f} for f in folders]


def history(info: dict) -> list[dict]:
    return history_rows(next(info["folder"].glob("run-*.wandb")))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> dict:
    """`train.py -m ablation=ppl logger=wandb` with credentials but no reachable server: two jobs, one process."""
    root = tmp_path_factory.mktemp("tracking")
    sweep = root / "sweep"
    command = [sys.executable, str(REPO / "train.py"), "-m", "ablation=ppl", *TRAIN, f"hydra.sweep.dir={sweep}"]
    command += ["eval.enabled=false", f"paths.cache_dir={cache_dir}", f"paths.dreambooth_root={root / 'no-dataset'}"]
    started = time.monotonic()
    proc = run(command, root)
    return {"root": root, "dir": sweep, "output": proc.stdout + proc.stderr, "seconds": time.monotonic() - started}


def test_each_sweep_job_is_its_own_wandb_run(sweep):
    runs = {job: wandb_runs(sweep["dir"] / job) for job in ("0", "1")}
    assert [len(r) for r in runs.values()] == [1, 1]
    first, second = runs["0"][0], runs["1"][0]
    assert first["id"] != second["id"]
    assert (first["name"], second["name"]) == (
        "demo-dreambooth-prior.weight=0.0",
        "demo-dreambooth-prior.weight=1.0",
    )
    assert first["group"] == second["group"] == "sweep" and first["job_type"] == second["job_type"] == "train"
    assert first["tags"] == ["ablation_ppl", "prior_weight=0.0"]
    assert (first["config"]["prior"]["weight"], second["config"]["prior"]["weight"]) == (0.0, 1.0)
    for info in (first, second):  # each history holds its own job's 3 steps only
        losses = [row["train/loss"] for row in history(info) if "train/loss" in row]
        assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    prior = {job: [r for r in history(info[0]) if "train/prior_loss" in r] for job, info in runs.items()}
    assert prior["0"] == [] and len(prior["1"]) == 3  # lambda = 0 makes no class images and logs no prior loss


def test_unreachable_server_falls_back_to_offline_quickly_with_one_line(sweep):
    lines = [line for line in sweep["output"].splitlines() if "is not reachable" in line]
    assert len(lines) == 2, lines  # one per job
    assert "W&B logs offline; upload later with `wandb sync " in lines[0] and str(sweep["dir"] / "0") in lines[0]
    assert "CommError" not in sweep["output"] and "Traceback" not in sweep["output"]
    assert sweep["seconds"] < 110  # the old behaviour: 110 s of retries per job, then a crash

    started = time.monotonic()
    assert not server_reachable("http://127.0.0.1:9", timeout=5)
    assert time.monotonic() - started < 2


@pytest.mark.slow  # two train.py runs: CI runs it (.ci/run)
@needs_dataset
def test_later_evaluation_logs_into_the_run_it_evaluates(sweep):
    run_dir = sweep["dir"] / "0"
    training = wandb_runs(run_dir)[0]
    tiny = tiny_eval_overrides(tiny_embedding_models(sweep["root"] / "embedders"))
    command = [sys.executable, "-m", "dreambooth_pl.evaluate", f"run_dir={run_dir}", *tiny]
    command += ["eval.num_prompts=2", "eval.sampler.num_inference_steps=2", "eval.pres.num_images=2"]
    command += [f"eval.prompts_file={DREAMBOOTH_ROOT / 'dataset' / 'prompts_and_classes.txt'}"]
    run([*command, f"hydra.run.dir={sweep['root'] / 'evaluate-log'}"], REPO)  # paths.dreambooth_root: the default

    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and runs[1]["id"] == training["id"]  # the same W&B run, resumed
    assert runs[1]["job_type"] == "train" and runs[1]["name"] == training["name"]
    record = json.loads((run_dir / "eval" / "metrics.json").read_text())
    photos = json.loads((run_dir / "pipeline" / "dreambooth.json").read_text())["instance_dir"]
    assert record["metadata"]["real_images_dir"] == photos and record["metadata"]["num_real"] == 5  # the demo's
    dino = record["metrics"]["dino"]
    logged = {k: v for row in history(runs[1]) for k, v in row.items()}
    assert logged["eval/dino"] == pytest.approx(dino, abs=1e-6) and logged["eval/images/_type"] == "table-file"
    assert runs[1]["summary"]["eval/dino"] == pytest.approx(dino, abs=1e-6)  # the runs table compares it
    assert len(wandb_runs(sweep["dir"] / "1")) == 1  # the other job's run is untouched


@pytest.mark.slow  # two train.py runs: CI runs it (.ci/run)
def test_resume_uses_the_runs_saved_config_and_wandb_run(sweep, cache_dir):
    run_dir = sweep["dir"] / "1"
    original = (run_dir / ".hydra" / "overrides.yaml").read_text()
    command = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    # paths outside the run folder and the configured roots are taken from the command, not the saved record
    command += [f"paths.cache_dir={cache_dir}", f"paths.dreambooth_root={sweep['root'] / 'no-dataset'}"]
    proc = run([*command, "trainer.max_steps=5"], sweep["root"])

    assert "Resuming" in proc.stdout + proc.stderr and "overrides on top: " in proc.stdout + proc.stderr
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.subject.name == "demo" and saved.prior.num_images == 2  # the run's own settings, not the defaults
    assert saved.trainer.max_steps == 5 and list(saved.tags) == ["ablation_ppl", "prior_weight=1.0"]
    assert (run_dir / ".hydra" / "history" / "0" / "overrides.yaml").read_text() == original  # kept, not overwritten
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert "trainer.max_steps=5" in overrides and "trainer.max_steps=3" not in overrides
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 5
    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # the same W&B run continues
    assert json.loads((run_dir / "wandb" / WANDB_RUN).read_text())["id"] == runs[0]["id"]


def test_resume_refuses_another_subject_unless_asked(sweep, cache_dir):
    run_dir = sweep["dir"] / "0"
    config_before = (run_dir / ".hydra" / "config.yaml").read_text()
    command = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", "ckpt_path=last", "subject=dog"]
    command += [f"paths.cache_dir={cache_dir}", f"paths.dreambooth_root={sweep['root'] / 'no-dataset'}"]
    proc = run(command, sweep["root"], expect=1)
    output = proc.stdout + proc.stderr
    assert "subject.name: 'demo' -> 'dog'" in output and "ckpt_allow_mismatch=true" in output
    assert "Traceback" not in output
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before  # the record is untouched
    assert not (run_dir / ".hydra" / "history").exists()


def test_merge_overrides_replaces_same_keys_and_appends_new_ones():
    saved = ["subject=custom", "subject.instance_dir=/photos", "trainer.max_steps=300", "hydra.run.dir=/r"]
    new = ["hydra.run.dir=/r", "ckpt_path=last", "trainer.max_steps=400"]
    assert merge_overrides(saved, new) == [
        "subject=custom",
        "subject.instance_dir=/photos",
        "trainer.max_steps=400",
        "hydra.run.dir=/r",
        "ckpt_path=last",
    ]
    # a key given twice in the saved command (a preset's value, then the user's) takes the new value once
    saved = ["trainer.max_steps=4", "seed=1", "trainer.max_steps=7"]
    assert merge_overrides(saved, ["trainer.max_steps=9"]) == ["trainer.max_steps=9", "seed=1"]


def test_config_errors_print_the_message_without_a_traceback(tmp_path, cache_dir):
    command = [sys.executable, str(REPO / "train.py"), *FAST, "sampler.resolution=60", "prior.weight=-1"]
    proc = run([*command, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"], tmp_path, expect=1)
    output = proc.stdout + proc.stderr
    assert "sampler.resolution=60 must be a positive multiple of 8" in output and "prior.weight=-1" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_unreachable_models_fail_in_seconds_before_any_class_image(tmp_path, cache_dir):
    """Offline with eval.enabled, and a hub model with the Hub out of reach: stop before the first class image."""
    prompts = REPO / "toyworld" / "dataset" / "prompts_and_classes.txt"  # a readable prompt list: it is checked first
    base = [sys.executable, str(REPO / "train.py"), *FAST, "subject=demo", f"paths.cache_dir={tmp_path / 'cache'}"]
    base += [f"paths.dreambooth_root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    started = time.monotonic()
    proc = run([*base, "eval.enabled=true", f"eval.prompts_file={prompts}"], tmp_path, expect=1)
    output = proc.stdout + proc.stderr
    assert "eval.dino.model='facebook/dino-vits16' is no local folder" in output and "(HF_HUB_OFFLINE is set)" in output
    assert "`hf download facebook/dino-vits16 --local-dir /path`" in output and "Traceback" not in output

    env_hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [*base, "model.pretrained=someone/some-model"],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), **env_hub},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "model.pretrained='someone/some-model' is no local folder" in output
    assert "http://127.0.0.1:9 is not reachable" in output
    assert time.monotonic() - started < 90  # two interpreter starts; the Hub's retries alone took minutes
    assert not (tmp_path / "cache" / "class_images").exists()


NOISE = (
    "requires torchvision",
    "litlogger",
    "anonymous setting has no effect",
    "LeafSpec",
    "No LoRA keys associated",
    "Epoch 0/-2",
    "There is a wandb run already in progress",
    "generated new fontManager",
    "Loading weights",
    "Loading pipeline components",
    "Images sizes do not match",
)


def test_console_shows_steps_and_where_outputs_are_without_library_noise(sweep):
    output = sweep["output"]
    assert [fragment for fragment in NOISE if fragment in output] == []
    assert "step 3/3 |" in output  # the step progress bar
    assert output.count("INFO: ") == 0  # Lightning's messages once, through Hydra's log format
    summaries = output.split("Outputs of this run:")[1:]
    assert len(summaries) == 2
    first = summaries[0].split("\n[")[0]
    assert (
        f"run folder: {sweep['dir'] / '0'}" in first and f"exported model: {sweep['dir'] / '0' / 'pipeline'}" in first
    )
    assert f"final samples: {sweep['dir'] / '0' / 'final_samples' / 'grid.png'}" in first
    assert f"W&B: wandb sync {sweep['dir'] / '0' / 'wandb' / 'offline-run-'}" in first


def test_sample_grids_carry_their_prompts_as_row_labels(sweep):
    grid = np.asarray(Image.open(sweep["dir"] / "0" / "samples" / "step_000003.png").convert("L"))
    rows, size = 4, 64  # 4 validation prompts, 2 images each at 64 px
    assert grid.shape[1] == 2 * size and grid.shape[0] > rows * size
    band = (grid.shape[0] - rows * size) // rows
    assert (grid[:band] < 100).any()  # dark text on the white band above the first row


def test_image_grid_row_labels_keep_every_image_intact():
    cells = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(4)]
    grid = image_grid(cells, cols=2, row_labels=["jungle", "snow"])  # one line each: equal bands
    pixels = np.asarray(grid)
    band = (grid.height - 64) // 2
    assert grid.width == 64 and band > 0
    assert (pixels[band : band + 32, 32:64] == (40, 0, 0)).all()  # row 0, image 1
    assert (pixels[2 * band + 32 :, :32] == (80, 0, 0)).all()  # row 1, image 0, below its own label
    assert (pixels[:band] < 100).any() and (pixels[band + 32 : 2 * band + 32] < 100).any()
    assert image_grid(cells, cols=2).size == (64, 64)  # without labels: the plain grid


def test_help_answers_quickly_without_loading_the_models(tmp_path):
    started = time.monotonic()
    proc = run([sys.executable, str(REPO / "train.py"), "--help"], tmp_path)
    assert "== Configuration groups ==" in proc.stdout and "subject:" in proc.stdout
    assert time.monotonic() - started < 10  # 19 s when the whole package was imported first


def test_dashboard_offline_prints_the_report_it_would_create(sweep):
    proc = run([sys.executable, "-m", "dreambooth_pl.dashboard", str(sweep["dir"])], REPO)
    heading, _, body = proc.stdout.partition("\n")
    assert "would create this report in project 'dreambooth-pl'" in heading
    spec = json.loads(body)
    ids = [wandb_runs(sweep["dir"] / job)[0]["id"] for job in ("0", "1")]
    assert spec["runset"] == {"name": "sweep", "group": ["sweep"], "runs": ids, "group_by": ["config.prior.weight"]}
    panels = spec["panels"]
    assert [p["type"] for p in panels] == ["line", *["bar"] * 5, "parallel_coordinates", "media", "table"]
    assert panels[0]["y"] == ["train/loss", "train/instance_loss", "train/prior_loss"]
    assert [p["metric"] for p in panels[1:6]] == ["eval/dino", "eval/clip_i", "eval/clip_t", "eval/pres", "eval/div"]
    assert panels[6]["columns"] == ["prior.weight", "eval/dino", "eval/clip_i", "eval/clip_t", "eval/pres", "eval/div"]
    assert panels[7]["keys"] == ["samples", "eval/grid", "eval/pres_grid"] and panels[8]["key"] == "eval/images"
    # job 1 is never evaluated in this module: its metric panels would be empty, and the command says so
    assert "logged no eval metrics" in proc.stderr and str(sweep["dir"] / "1") in proc.stderr.split("run_dir=")[1]

    pytest.importorskip("wandb_workspaces")
    report = build_report(spec, entity="someone")  # W&B's own report objects, built without the network
    assert report.project == "dreambooth-pl" and len(report.blocks) == 1
    grid = report.blocks[0]
    assert len(grid.panels) == len(panels) and grid.runsets[0].groupby == ["config.prior.weight"]


@pytest.mark.slow
def test_a_failed_job_ends_its_wandb_run_and_the_next_job_gets_its_own(tmp_path, cache_dir):
    """Job 0 fails after its W&B run started (its evaluation's DINO weights are truncated, which only loading
    them finds, when it evaluates); job 1 (no evaluation), in the same process, must get a run of its own."""
    prompts = REPO / "toyworld" / "dataset" / "prompts_and_classes.txt"
    models = tiny_embedding_models(tmp_path / "embedders")
    damaged = tmp_path / "damaged-dino"
    shutil.copytree(models["dino"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    tiny = tiny_eval_overrides({**models, "dino": str(damaged)})
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(REPO / "train.py"), "-m", *TRAIN, "eval.enabled=true,false", *tiny]
    command += [f"eval.prompts_file={prompts}", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}"]
    proc = run([*command, f"paths.dreambooth_root={tmp_path}"], tmp_path, expect=1)
    assert "is a damaged model folder" in proc.stdout + proc.stderr
    failed, succeeded = wandb_runs(sweep / "0"), wandb_runs(sweep / "1")
    assert len(failed) == len(succeeded) == 1 and failed[0]["id"] != succeeded[0]["id"]
    assert (failed[0]["exit_code"], succeeded[0]["exit_code"]) == (1, 0)
    assert (sweep / "1" / "pipeline").is_dir()
