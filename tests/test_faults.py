"""Faults and crafted input, round two: run folders that cannot run code, one run per folder, locks that say
what they wait for, sweeps that survive a failed job, every bad value and file named before any work."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from dreambooth_pl.checks import check_config
from dreambooth_pl.evaluation.metrics import DinoEmbedder, Preprocess
from dreambooth_pl.evaluation.protocol import read_class_table, read_prompt_lists
from dreambooth_pl.models.hub import ModelNotReachable, from_pretrained_or_explain
from dreambooth_pl.runs.checkpoints import CheckpointError
from dreambooth_pl.runs.export import write_dir_atomically
from dreambooth_pl.runs.layout import WANDB_RUN
from dreambooth_pl.runs.loggers import read_wandb_run
from dreambooth_pl.toyworld.pretrain import build
from dreambooth_pl.toyworld.subjects import SUBJECTS_FILE, subject_views
from dreambooth_pl.training.class_images import MANIFEST, ClassImageCache
from dreambooth_pl.training.job import train
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.files import DiskFull, ProcessLock, atomic_file
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset
from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides
from tests.test_toyworld import compose_toyworld

HOLD_LOCK = "import sys, time; from dreambooth_pl.util.files import ProcessLock; ProcessLock(sys.argv[1], 'x').acquire(); "


def train_py(args: list[str], cwd: Path, expect: int) -> str:
    """train.py's console output; it must exit with `expect`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, output[-5000:]
    return output


def hold(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process holding `lock` for `seconds` (then exiting cleanly)."""
    code = HOLD_LOCK + f"print('held', flush=True); time.sleep({seconds})"
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def records(run: Path) -> dict[str, bytes]:
    """Every file of a run folder but its (emptied) lock file."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".run.lock"]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def saved_run(run: Path, config: str, overrides: str) -> Path:
    """A run folder holding only Hydra's saved config and overrides, as a resume reads them."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(config)
    (run / ".hydra" / "overrides.yaml").write_text(overrides)
    return run


def test_a_crafted_run_folder_cannot_run_code(tmp_path):
    """A shared run folder whose saved overrides instantiate os.system: refused before any work, naming the
    file, the key and the target; nothing runs and nothing in the folder changes."""
    run = saved_run(
        tmp_path / "downloaded-run", "seed: 42\n", "- model.vae={_target_:os.system,command:'touch pwned'}\n"
    )
    before = records(run)
    output = train_py([f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, expect=1)
    assert f"{run / '.hydra' / 'overrides.yaml'}, entry 1" in output and "_target_ would instantiate code" in output
    assert "Traceback" not in output
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    assert records(run) == before  # no .hydra rewritten, no history copy, no class image


def test_an_unreadable_saved_config_stops_the_resume_naming_it(tmp_path):
    run = saved_run(tmp_path / "run", "model: {name: toy\n  : [\x00garbage", "- seed=1\n")
    before = records(run)
    output = train_py([f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, expect=1)
    assert f"{run / '.hydra' / 'config.yaml'} cannot be read" in output and "Traceback" not in output
    assert records(run) == before


def test_a_second_run_in_a_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = hold(run / ".run.lock", 60)
    started = time.monotonic()
    output = train_py([f"hydra.run.dir={run}", "trainer.max_steps=0"], tmp_path, expect=1)
    assert f"{run} is in use by another run (pid {holder.pid})" in output
    assert time.monotonic() - started < 30 and not (run / ".hydra").exists()  # refused at once, nothing written

    holder.kill()  # SIGKILL: its pid stays in the lock file
    holder.wait()
    output = train_py([f"hydra.run.dir={run}", "trainer.max_steps=0"], tmp_path, expect=1)
    took_over = f"Took over {run / '.run.lock'} (the run folder) from pid {holder.pid}, which is no longer running"
    assert took_over in output
    assert "trainer.max_steps=0 must be >= 1" in output  # then the run went on to its own checks


def test_a_waiting_process_says_what_it_waits_for_and_who_holds_it(tmp_path, caplog):
    lock = tmp_path / ".lock"
    holder = hold(lock, 1.0)
    with caplog.at_level(logging.WARNING), ProcessLock(lock, "the evaluation images", say_every=0.3):
        pass
    holder.wait()
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting")]
    assert waits and f"for the evaluation images ({lock}), held by pid {holder.pid}" in waits[0]
    assert "no longer running" not in caplog.text  # a clean release leaves nothing to take over


@pytest.mark.slow  # a sweep that trains and evaluates: about a minute on a busy 2-core machine
@needs_dataset
def test_a_sweep_goes_on_after_a_failed_job_and_its_report_says_what_is_missing(tmp_path, cache_dir):
    """Job 0 has a bad setting, job 1 trains and is evaluated; the base-model evaluation at the end fails
    (as if the sweep were stopped there). The sweep still reports, lists the failed job and the missing base
    row at the top, and exits 1 naming the job; `python -m dreambooth_pl.report` says the same, also when no
    job was evaluated."""
    sweep = tmp_path / "sweep"
    tiny = tiny_eval_overrides(tiny_embedding_models(tmp_path / "embedders"))
    command = ["-m", *FAST, "trainer.max_steps=0,2", "eval.enabled=true", *tiny, "eval.num_prompts=2"]
    command += ["eval.images_per_prompt=2", "eval.pres.num_images=2", "eval.sampler.num_inference_steps=2"]
    command += [f"paths.cache_dir={cache_dir}", f"paths.dreambooth_root={DREAMBOOTH_ROOT}"]
    command += [f"hydra.sweep.dir={sweep}"]
    command += ["+hydra.callbacks.report._target_=dreambooth_pl.reporting.sweep.SweepReport"]
    command += [f"+hydra.callbacks.report.base_model={tmp_path / 'no-such-model'}"]
    output = train_py(command, tmp_path, expect=1)
    failure = "job 0 (trainer.max_steps=0) failed: Invalid config: trainer.max_steps=0 must be >= 1"
    assert f"[sweep] 1 job(s) of {sweep} failed:\n  {failure.replace(' failed', '', 1)}" in output
    assert (sweep / "1" / "eval" / "metrics.json").is_file()  # the sweep went on
    report = (sweep / "report" / "report.md").read_text()
    top = report.split("\n## Table 1")[0]
    assert "## Missing from this report" in top and f"- {failure}" in top
    assert "- base model row: not evaluated for teapot" in top

    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_pl.report", str(sweep), "-o", str(tmp_path / "again")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and f"- {failure}" in proc.stdout
    (sweep / "1" / "eval" / "metrics.json").unlink()  # nothing evaluated: the error still lists the failed job
    proc = subprocess.run([sys.executable, "-m", "dreambooth_pl.report", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 1 and f"\n  {failure}" in proc.stderr and "Traceback" not in proc.stderr
    assert "job 1 (trainer.max_steps=2): no eval/metrics.json" in proc.stderr

    fail_fast = tmp_path / "fail-fast"
    output = train_py([*command[:-3], f"hydra.sweep.dir={fail_fast}", "fail_fast=true"], tmp_path, expect=1)
    assert "fail_fast=true: stopping the sweep at job 0" in output and not (fail_fast / "1").exists()


def test_a_damaged_metrics_file_is_named_and_left_out_of_the_report(tmp_path):
    run = tmp_path / "run" / "eval"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"metrics": {"dino": 0.5')
    proc = subprocess.run([sys.executable, "-m", "dreambooth_pl.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{run / 'metrics.json'} is not a whole evaluation record (JSONDecodeError" in proc.stderr


EVAL = ["eval.enabled=true"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prior.weight=nan"], "prior.weight=nan must be a finite number"),  # NaN > 0 is False: PPL silently off
        (["module.optimizer.lr=-1"], "module.optimizer.lr=-1 must be > 0"),
        (["module.optimizer.lr=nan"], "module.optimizer.lr=nan must be a finite number"),
        (["sampler.guidance_scale=inf"], "sampler.guidance_scale=inf must be a finite number"),
        (["seed=-1"], "seed=-1 must be between 0 and 2**32 - 1"),
        (["seed=4294967296"], "seed=4294967296 must be between 0 and 2**32 - 1"),
        (["seed=1.5"], "seed=1.5 must be a whole number"),
        (["identifier=sks", "identifier.token=teapot"], "identifier.token='teapot' is the class noun"),
        (["identifier=sks", "identifier.token=Teapot"], "identifier.token='Teapot' is the class noun"),
        ([*EVAL, "eval.sampler.resolution=60"], "eval.sampler.resolution=60 must be a positive multiple of 8"),
        ([*EVAL, "eval.images_per_prompt=1"], "eval.images_per_prompt=1: DIV compares images of one prompt"),
        ([*EVAL, "eval.seed=-5"], "eval.seed=-5 must be between 0 and 2**32 - 1"),
        ([*EVAL, "eval.pres.seed=0.5"], "eval.pres.seed=0.5 must be a whole number"),
        (["module.quantize_base=nf8"], "module.quantize_base='nf8': use nf4 or null."),
        (["module.quantize_base=nf4"], "module.quantize_base=nf4: a 4-bit base cannot be fine-tuned; use method=lora."),
        ([*EVAL, "eval.sampler.num_inference_steps=0"], "eval.sampler.num_inference_steps=0 must be >= 1"),
        ([*EVAL, "eval.real_images_dir=/no/photos"], "eval.real_images_dir='/no/photos': folder does not exist"),
    ],
)
def test_every_number_is_checked_before_any_work(tmp_path, cache_dir, overrides, message):
    cfg = compose_train([*FAST, *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value)


def test_a_damaged_class_image_manifest_is_rebuilt(tmp_path, tiny_pretrained, caplog):
    """The images are whole, their manifest is not (a disk error, a hand edit): nothing is generated again,
    and the manifest is rewritten with a warning naming it."""
    cache = ClassImageCache(str(tmp_path), tiny_pretrained, {"num_inference_steps": 1, "resolution": 32}, seed=3)
    assert cache.ensure("a teapot", 2) == 2
    manifest = cache.folder("a teapot") / MANIFEST
    for damage in ('{"key": {"prompt": "a tea', '{"images": ["00000.png"]}'):
        manifest.write_text(damage)
        with caplog.at_level(logging.WARNING):
            assert cache.ensure("a teapot", 2) == 0
        assert f"{manifest} is missing or damaged; rewriting it" in caplog.text
        assert json.loads(manifest.read_text())["images"] == ["00000.png", "00001.png"]


def test_one_image_per_prompt_evaluates_without_div_when_asked(tmp_path, cache_dir):
    no_div = [*FAST, *EVAL, "eval.images_per_prompt=1", "eval.div.enabled=false"]
    check_config(compose_train(no_div, tmp_path, cache_dir))


# --------------------------------------------------------------------------- every file named


def test_a_prompts_file_that_is_not_the_datasets_is_named(tmp_path):
    binary, garbage = tmp_path / "binary.txt", tmp_path / "garbage.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    garbage.write_text("lorem ipsum\ndolor sit amet\n")
    with pytest.raises(ConfigError, match=f"eval.prompts_file='{binary}' is not a text file"):
        read_class_table(binary)
    with pytest.raises(ConfigError, match=f"eval.prompts_file='{garbage}': found no `subject_name,class` table"):
        read_class_table(garbage)
    with pytest.raises(ConfigError, match=f"eval.prompts_file='{garbage}': found no Object Prompts"):
        read_prompt_lists(garbage)


def test_a_damaged_wandb_run_record_is_named(tmp_path):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / WANDB_RUN).write_text('{"id": "ab')
    with pytest.raises(ConfigError, match=f"{tmp_path / 'wandb' / WANDB_RUN} is damaged .*Delete it"):
        read_wandb_run(tmp_path)


def test_a_local_embedding_model_without_its_config_stops_training_before_it_starts(tmp_path, cache_dir, monkeypatch):
    """The toy world's dino/ without config.json: named up front, not after training and export."""
    dino = tmp_path / "toyworld" / "dino"
    dino.mkdir(parents=True)
    (dino / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(DreamBoothModule, "__init__", lambda *a, **k: pytest.fail("loaded weights first"))
    cfg = compose_train([*FAST, *EVAL, f"eval.dino.model={dino}"], tmp_path / "run", cache_dir)
    with pytest.raises(ModelNotReachable, match=f"eval.dino.model='{dino}' is not a model folder"):
        train(cfg)


def test_a_truncated_weights_file_in_a_local_model_is_damaged_not_unreachable(tmp_path, tiny_pretrained):
    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    (weights,) = (model / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotReachable) as err:
        from_pretrained_or_explain(UNet2DConditionModel, str(model), "unet")
    assert f"model.pretrained='{model}' is a damaged model folder" in str(err.value)
    assert "hf download" not in str(err.value) and "\n" not in str(err.value)


def test_an_evaluation_reader_with_damaged_weights_names_its_folder(tmp_path):
    models = tiny_embedding_models(tmp_path)
    weights = Path(models["dino"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotReachable) as err:
        DinoEmbedder(models["dino"], Preprocess(32, 32, [0.5] * 3, [0.5] * 3), device="cpu")
    message = str(err.value)
    assert message.startswith(f"eval.dino.model='{models['dino']}' is a damaged model folder") and "\n" not in message


@pytest.mark.slow  # two entry points started: about 40 s on a busy 2-core machine
def test_evaluate_and_generate_name_a_missing_folder_by_its_option(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = tmp_path / "no-such-run"
    cases = [("evaluate", "run_dir", "no such folder"), ("generate", "generate.pipeline", "no exported model there")]
    for module, option, problem in cases:
        command = [sys.executable, "-m", f"dreambooth_pl.{module}", f"{option}={missing}", "logger.wandb=null"]
        command = command[:-1] if module == "generate" else [*command, f"hydra.run.dir={tmp_path / 'log'}"]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 1 and f"{option}='{missing}': {problem}" in output, output[-3000:]
        assert "Traceback" not in output


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_partial_is_kept(tmp_path):
    def fills_up(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 3 * 2**20)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "pipeline"
    with pytest.raises(DiskFull) as err:
        write_dir_atomically(target, fills_up)
    message = str(err.value)
    assert message.startswith(f"No space left on the device of {target}: writing it needs more than 3.0 MiB (")
    assert "\n" not in message and list(tmp_path.iterdir()) == []  # no staging folder left

    image = tmp_path / "eval" / "images" / "p00_00.png"
    with pytest.raises(DiskFull, match=f"No space left on the device of {image}"), atomic_file(image) as handle:
        handle.write(b"png bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(image.parent.iterdir()) == []


def test_a_checkpoint_of_another_architecture_is_refused_before_training(tmp_path, cache_dir, monkeypatch):
    """ckpt_allow_mismatch=true lets other settings in, not weights of other shapes (an SDXL checkpoint in
    an SD run): named before training instead of a state-dict traceback."""
    other = tmp_path / "sdxl.ckpt"
    torch.save({"global_step": 3, "state_dict": {"unet.conv_in.weight": torch.zeros(8, 4, 3, 3)}}, other)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("started training"))
    cfg = compose_train([*FAST, f"ckpt_path={other}", "ckpt_allow_mismatch=true"], tmp_path / "run", cache_dir)
    with pytest.raises(CheckpointError, match=r"holds another model's weights: 1 of its 1 tensors .*unet.conv_in"):
        train(cfg)


# --------------------------------------------------------------------------- the toyworld command


def test_toyworld_stages_must_be_a_list_of_known_stages(tmp_path):
    for stages, message in (("bogus", "stages='bogus' must be a list"), ("[bogus]", "['bogus'] unknown")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build(compose_toyworld([f"out_dir={tmp_path}", f"stages={stages}"]))
    assert not any(tmp_path.iterdir())


def test_the_toyworld_subjects_stage_writes_all_subjects_or_none(tmp_path, monkeypatch):
    """A disk that fills up at the third subject's photos: no dataset folder with 2 of 5 subjects."""
    cfg = compose_toyworld([f"out_dir={tmp_path}", "stages=[subjects]", "data.size=32"])
    real_save, saved = Image.Image.save, []

    def fills_up(image, path, *args, **kwargs):
        if len(saved) == 2 * len(subject_views(cfg.subjects[0])):
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_up)
    with pytest.raises(DiskFull, match=f"No space left on the device of {tmp_path / 'dataset'}"):
        build(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing partial
    monkeypatch.setattr(Image.Image, "save", real_save)
    build(cfg)
    names = sorted(p.name for p in (tmp_path / "dataset").iterdir())
    assert names == sorted([*(s.name for s in cfg.subjects), "prompts_and_classes.txt", SUBJECTS_FILE])
