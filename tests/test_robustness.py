"""Crashes, kills and resume: nothing half-written is ever used, and resumed runs match uninterrupted ones."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_pl.checks import check_config
from dreambooth_pl.evaluation.record import provenance_from_config
from dreambooth_pl.models.hub import ModelNotReachable, check_pretrained
from dreambooth_pl.models.samples import generate
from dreambooth_pl.runs.checkpoints import AtomicCheckpointIO, CheckpointError, checkpoint_step
from dreambooth_pl.runs.export import recover_exports, write_dir_atomically
from dreambooth_pl.runs.records import saved_run_config
from dreambooth_pl.training.class_images import ClassImageCache
from dreambooth_pl.training.data import DreamBoothDataModule
from dreambooth_pl.training.job import train
from dreambooth_pl.training.module import DreamBoothModule, TrainingDiverged
from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.images import ImageFolderError, is_readable_image, list_images, save_atomically
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset

RESUME_RUN = [
    *FAST,
    "trainer.max_steps=150",
    "callbacks.checkpoint.every_n_train_steps=23",  # 5 steps an epoch: checkpoints fall mid-epoch
    "export.samples.prompts=[]",
    "data.random_flip=true",
    "data.center_crop=false",
    "logger=csv",
    "trainer.log_every_n_steps=1",
]
SMALL_SAMPLER = {"num_inference_steps": 2, "resolution": 32, "batch_size": 4}


def train_py(args: list[str], log: Path) -> subprocess.Popen:
    """train.py in the background, its output in a file (a pipe nobody reads could fill up and block it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=log.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def unet_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def resume_args(run_dir: Path, cache_dir: Path) -> list[str]:
    return [
        *RESUME_RUN,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]


def csv_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every row of the run's one CSV log."""
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    rows = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


def assert_same_run(a: Path, b: Path, may_lack: int | None = None) -> None:
    """Same final UNet and the same logged losses, step by step (`b` may lack the row of step `may_lack`)."""
    wa, wb = unet_weights(a), unet_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, f"resumed weights differ by {worst}"
    la, lb = dict(csv_losses(a)), dict(csv_losses(b))
    assert list(la) == list(range(150))
    assert [s for s in range(150) if s != may_lack] == [s for s in lb if s != may_lack]  # no gap, no repeat
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in lb)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir) -> Path:
    """RESUME_RUN without any interruption: the reference for every resume test."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = train_py(resume_args(run, cache_dir), run.parent / "straight.log")
    assert proc.wait(timeout=600) == 0, (run.parent / "straight.log").read_text()[-3000:]
    return run


@pytest.mark.slow
@needs_dataset
def test_killed_run_resumes_to_the_same_weights(tmp_path, cache_dir, straight_run):
    """SIGKILL mid-epoch, then `ckpt_path=last` in the same run folder: same final UNet as no kill, and one
    CSV log that reads as the uninterrupted run's (rows logged after the checkpoint are not repeated)."""
    killed = tmp_path / "killed"
    proc = train_py(resume_args(killed, cache_dir), tmp_path / "killed.log")
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "pipeline").exists(), "the run finished before it could be killed"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 150 and step % 5, f"checkpoint at step {step} should be mid-epoch (5 steps an epoch)"
    # Rows reach disk as they are logged; Lightning logs a step's row just after that step's checkpoint, so a
    # kill in between loses that one row (the resumed run starts at the next step).
    assert [s for s, _ in csv_losses(killed)][: step - 1] == list(range(step - 1))

    proc = train_py([*resume_args(killed, cache_dir), "ckpt_path=last"], tmp_path / "resumed.log")
    proc.wait(timeout=600)
    out = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "Restored all states" in out
    assert_same_run(straight_run, killed, may_lack=step - 1)


class SigtermAtStep(L.Callback):
    """Test helper (a `callbacks` entry of train.py): the process sends itself SIGTERM as step `step` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@needs_dataset
def test_sigterm_saves_the_current_step_exits_non_zero_and_resumes_exactly(tmp_path, cache_dir, straight_run):
    run = tmp_path / "preempted"
    sigterm = ["+callbacks.sigterm._target_=tests.test_robustness.SigtermAtStep", "+callbacks.sigterm.step=37"]
    proc = train_py([*resume_args(run, cache_dir), *sigterm], tmp_path / "preempted.log")
    assert proc.wait(timeout=600) == 143, (tmp_path / "preempted.log").read_text()[-3000:]
    assert "Stopped by SIGTERM at step 38" in (tmp_path / "preempted.log").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 38
    assert not (run / "pipeline").exists()

    # no sigterm callback: the test's own callback is not code a run folder may ask for (run_folders.py)
    resume = [*resume_args(run, cache_dir), "ckpt_path=last", "++callbacks.sigterm=null"]
    proc = train_py(resume, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert_same_run(straight_run, run)


@pytest.mark.slow  # three train.py runs: about 2 minutes on a busy 2-core machine
@needs_dataset
def test_last_ckpt_is_always_the_newest_step_and_training_further_continues_the_run(tmp_path, cache_dir):
    """SIGTERM at step 4, resume to step 7, then "train further" from `<run>/checkpoints/last.ckpt` (from
    another folder, no hydra.run.dir) to step 9: one checkpoint file throughout, always the newest step, and
    the further training continues that run in its own folder with no step lost or repeated."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    common = [*FAST, "export.samples.prompts=[]", "logger=csv", "trainer.log_every_n_steps=1"]
    common += ["callbacks.checkpoint.every_n_train_steps=3", f"paths.cache_dir={cache_dir}"]
    common += [f"paths.dreambooth_root={DREAMBOOTH_ROOT}"]
    last = run / "checkpoints" / "last.ckpt"
    sigterm = ["+callbacks.sigterm._target_=tests.test_robustness.SigtermAtStep", "+callbacks.sigterm.step=3"]
    proc = train_py([*common, "trainer.max_steps=7", f"hydra.run.dir={run}", *sigterm], tmp_path / "a.log")
    assert proc.wait(timeout=600) == 143, (tmp_path / "a.log").read_text()[-3000:]
    assert checkpoint_step(last) == 4

    resume = [*common, "trainer.max_steps=7", f"hydra.run.dir={run}", "ckpt_path=last", "++callbacks.sigterm=null"]
    proc = train_py(resume, tmp_path / "b.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert checkpoint_step(last) == 7  # not a `last-v1.ckpt` beside a stale last.ckpt
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # one checkpoint file per run

    # what a saved record may not say (paths outside the roots, `+` keys) is given again by the command
    again = [p for p in common if p.startswith("paths.")] + ["++callbacks.sigterm=null"]
    proc = train_py([f"ckpt_path={last}", "trainer.max_steps=9", *again], elsewhere / "c.log")
    assert proc.wait(timeout=600) == 0, (elsewhere / "c.log").read_text()[-3000:]
    out = (elsewhere / "c.log").read_text()
    assert f"is a checkpoint of the run in {run}: training that run further" in out
    assert "exists and is not empty" not in out and "dirpath has changed" not in out
    assert [p.name for p in elsewhere.iterdir()] == ["c.log"]  # no new run folder
    assert checkpoint_step(last) == 9 and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    assert [s for s, _ in csv_losses(run)] == list(range(9))  # steps 0-8, each once
    assert json.loads((run / "pipeline" / "dreambooth.json").read_text())["steps"] == 9


@pytest.mark.slow
def test_killed_class_image_generation_leaves_only_complete_images(tmp_path, tiny_pretrained):
    script = (
        "import sys; from dreambooth_pl.training.class_images import ClassImageCache;"
        f"ClassImageCache({str(tmp_path)!r}, {tiny_pretrained!r}, "
        "{'num_inference_steps': 20, 'resolution': 64, 'batch_size': 1}).ensure('a teapot', 500)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cache = ClassImageCache(
        str(tmp_path), tiny_pretrained, {"num_inference_steps": 20, "resolution": 64, "batch_size": 1}
    )
    folder = cache.folder("a teapot")
    deadline = time.time() + 120
    while len(list(folder.glob("0*.png"))) < 5 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    done = sorted(folder.glob("0*.png"))
    assert 5 <= len(done) < 500
    assert all(is_readable_image(p) for p in done)  # no final name ever holds half an image
    missing = cache.missing("a teapot", 12)
    assert cache.ensure("a teapot", 12) == len(missing) == 12 - len([p for p in done if int(p.stem) < 12])
    assert not list(folder.glob(".*.png"))  # stale temporary files are cleared
    assert cache.ensure("a teapot", 12) == 0


@needs_dataset
def test_nan_loss_stops_with_the_last_good_state(tmp_path, cache_dir, monkeypatch):
    original = DreamBoothModule.compute_loss

    def poisoned(self, batch, noise=None, timesteps=None):
        loss = original(self, batch, noise, timesteps)
        return loss._replace(total=loss.total * float("nan")) if self.global_step == 3 else loss

    monkeypatch.setattr(DreamBoothModule, "compute_loss", poisoned)
    # the state goes where the config puts checkpoints (callbacks.checkpoint.dirpath), not a fixed folder
    moved = [f"callbacks.{name}.dirpath={tmp_path / 'ckpts'}" for name in ("checkpoint", "preemption")]
    cfg = compose_train([*FAST, "trainer.max_steps=10", *moved], tmp_path, cache_dir)
    with pytest.raises(TrainingDiverged, match="at step 3; the last good state is saved in .*last-good.ckpt") as err:
        train(cfg)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)  # train.py: one line, exit 1
    state = torch.load(tmp_path / "ckpts" / "last-good.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "pipeline").exists()  # no garbage model is exported


def test_source_never_unpickles_or_runs_remote_code():
    source = "\n".join(p.read_text() for p in (REPO / "dreambooth_pl").glob("*.py"))
    assert "trust_remote_code" not in source
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call


@pytest.mark.slow
@needs_dataset
def test_api_keys_never_reach_outputs(tmp_path, cache_dir):
    secret = "0123456789abcdef0123456789abcdef01234567"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_API_KEY": secret, "HF_TOKEN": "hf_" + secret}
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *FAST,
            "logger=wandb",
            "logger.wandb.mode=offline",
            f"hydra.run.dir={run}",
            f"paths.cache_dir={cache_dir}",
            f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert secret not in proc.stdout + proc.stderr
    written = [p for p in run.rglob("*") if p.is_file()]
    assert len(written) > 10
    for path in written:
        assert secret.encode() not in path.read_bytes(), path


def start_together(scripts: list[str], workdir: Path, timeout: float = 300) -> list[str]:
    """Python snippets started at the same moment, each in its own process; their outputs (each must exit 0)."""
    logs = [workdir / f"together-{i}.log" for i in range(len(scripts))]
    procs = []
    for script, log in zip(scripts, logs):
        with log.open("w") as out:
            procs.append(
                subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            )
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    return [log.read_text() for log in logs]


def _export_then_die_at(step: int, target: Path, version: str) -> None:
    """In a child process: re-export `target` and die (no cleanup, as SIGKILL) just before its `step`-th
    rename or delete."""
    calls = {"n": 0}

    def dying(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                os._exit(9)
            return fn(*args, **kwargs)

        return wrapped

    os.replace, shutil.rmtree = dying(os.replace), dying(shutil.rmtree)
    write_dir_atomically(target, lambda folder: _fake_export(folder, version))
    os._exit(0)


def _fake_export(folder: Path, version: str) -> None:
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / part).mkdir()
        (folder / part / "weights").write_text(version)


def _export_version(folder: Path) -> str | None:
    """The version of a complete export, None if any part is missing or mixed."""
    versions = {(folder / part / "weights").read_text() for part in ("unet", "vae", "text_encoder", "scheduler")
                if (folder / part / "weights").is_file()}  # fmt: skip
    complete = all((folder / part / "weights").is_file() for part in ("unet", "vae", "text_encoder", "scheduler"))
    return versions.pop() if complete and len(versions) == 1 else None


def test_a_kill_at_any_moment_of_a_re_export_leaves_the_old_or_the_new_model(tmp_path):
    """SIGKILL before each rename or delete of a re-export: the folder is whole (old or new), or the old one
    is whole aside and the next export's start puts it back; no staging folder outlives the next export."""
    context = multiprocessing.get_context("fork")
    outcomes = set()
    for step in range(1, 10):
        target = tmp_path / f"kill{step}" / "pipeline"
        write_dir_atomically(target, lambda folder: _fake_export(folder, "old"))
        child = context.Process(target=_export_then_die_at, args=(step, target, "new"))
        child.start()
        child.join()
        if child.exitcode == 0:
            break
        recover_exports(target.parent)  # what the next run does first
        outcomes.add(_export_version(target))
        assert _export_version(target) in ("old", "new"), f"killed before operation {step}"
        assert [p.name for p in target.parent.iterdir()] == ["pipeline"]  # no staging folder is left
        write_dir_atomically(target, lambda folder: _fake_export(folder, "newer"))
        assert _export_version(target) == "newer"
        assert [p.name for p in target.parent.iterdir()] == ["pipeline"]
    assert outcomes == {"old", "new"} and child.exitcode == 0


def test_written_files_follow_the_umask_so_a_group_can_read_an_export(tmp_path, tiny_pretrained):
    old = os.umask(0o022)
    try:
        grid = generate(tiny_pretrained, ["a teapot"], str(tmp_path / "samples"), SMALL_SAMPLER, images_per_prompt=1)
        save_atomically(Image.new("RGB", (8, 8)), tmp_path / "image.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "samples").stat().st_mode) == 0o755
    for path in (grid, tmp_path / "samples" / "p00_00.png", tmp_path / "image.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_render_folder_holds_exactly_what_its_prompts_list(tmp_path, tiny_pretrained):
    out = tmp_path / "final_samples"
    generate(tiny_pretrained, ["a teapot", "a dog", "a cat"], str(out), SMALL_SAMPLER, images_per_prompt=1)
    generate(tiny_pretrained, ["a red teapot"], str(out), SMALL_SAMPLER, images_per_prompt=2)
    assert (out / "prompts.txt").read_text() == "a red teapot\n"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00_00.png", "p00_01.png", "prompts.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["final_samples"]  # no staging folder left behind


def test_a_checkpoint_file_is_always_whole_even_on_a_full_disk(tmp_path, monkeypatch):
    """The fault: Lightning stages a checkpoint in $TMPDIR and moves it, a copy when the run folder is on
    another filesystem; the disk filling up mid-copy left a truncated last.ckpt. Here: another filesystem
    (rename fails with EXDEV) that fills up half-way through any copy, then a full disk during the write."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"global_step": 1, "weights": torch.zeros(4096)}, path)
    real_rename, real_save = os.rename, torch.save

    def other_filesystem(src, dst, *args, **kwargs):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    def fills_up(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", other_filesystem)
    monkeypatch.setattr(shutil, "copyfile", fills_up)
    try:
        checkpoint_io.save_checkpoint({"global_step": 2, "weights": torch.ones(4096)}, path)
    except OSError:
        pass
    assert checkpoint_step(path) in (1, 2)

    def fills_up_while_writing(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_up_while_writing)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint({"global_step": 3, "weights": torch.ones(4096)}, path)
    assert checkpoint_step(path) in (1, 2)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@needs_dataset
def test_resume_from_last_skips_an_unreadable_checkpoint(tmp_path, cache_dir, caplog):
    every_2 = [*FAST, "callbacks.checkpoint.every_n_train_steps=2"]  # the resumed run's too: Lightning warns otherwise
    first = [*every_2, "trainer.max_steps=4", "export.enabled=false", "callbacks.checkpoint.save_top_k=1"]
    train(compose_train(first, tmp_path, cache_dir))  # save_top_k=1 keeps step 4 too
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a full disk left before checkpoints were written whole
    (readable,) = tmp_path.glob("checkpoints/epoch=*-step=4.ckpt")
    os.utime(readable, (time.time() - 60,) * 2)  # older than the truncated last.ckpt
    with caplog.at_level(logging.WARNING):
        result = train(compose_train([*every_2, "trainer.max_steps=6", "ckpt_path=last"], tmp_path, cache_dir))
    assert "Skipping ckpt_path=" in caplog.text and "last.ckpt" in caplog.text
    assert result["global_step"] == 6  # resumed at step 4, not from scratch


def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path, cache_dir, monkeypatch):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    monkeypatch.setattr(DreamBoothModule, "__init__", lambda *a, **k: pytest.fail("loaded weights first"))
    with pytest.raises(CheckpointError, match=r"ckpt_path='.*notes.ckpt' is not a readable checkpoint") as err:
        train(compose_train([*FAST, f"ckpt_path={notes}"], tmp_path, cache_dir))
    assert "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError, match="no such file"):
        train(compose_train([*FAST, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path, cache_dir))


def test_a_decompression_bomb_is_named_and_skipped_when_asked(tmp_path, monkeypatch):
    for i in range(3):
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"good{i}.png")
    Image.new("1", (200, 200)).save(tmp_path / "bomb.png")  # a 20000x20000 PNG, scaled with PIL's limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    with pytest.raises(ImageFolderError, match="bomb.png: cannot read image.*decompression bomb"):
        DreamBoothDataModule(str(tmp_path), "a sks dog", 64)
    assert len(DreamBoothDataModule(str(tmp_path), "a sks dog", 64, skip_unreadable=True).instance_images) == 3
    assert not is_readable_image(tmp_path / "bomb.png")


def test_a_folder_of_link_loops_names_them(tmp_path):
    (tmp_path / "photo.png").symlink_to(tmp_path / "photo.png")
    with pytest.raises(ImageFolderError, match="only broken symbolic links or link loops: photo.png"):
        list_images(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ImageFolderError, match="'.*loop' is a broken symbolic link or a link loop"):
        list_images(tmp_path / "loop")


def test_an_incomplete_model_folder_is_named(tmp_path, tiny_pretrained):
    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    for path in (model / "unet").iterdir():
        path.unlink()  # an interrupted copy
    with pytest.raises(ModelNotReachable, match=r"incomplete diffusers pipeline.*unet/ has no config.json"):
        check_pretrained(str(model))


def test_many_small_photos_give_one_warning(tmp_path, caplog):
    for i in range(40):
        Image.new("RGB", (32, 32), "red").save(tmp_path / f"{i:03d}.png")
    with caplog.at_level(logging.WARNING):
        DreamBoothDataModule(str(tmp_path), "a sks dog", 64)
    small = [r.getMessage() for r in caplog.records if "smaller than the training resolution" in r.getMessage()]
    assert len(small) == 1 and small[0].startswith("40 of 40 images")
    assert "000.png (32x32)" in small[0] and "039.png" not in small[0]


def test_class_images_never_seen_are_warned_about_and_the_manifest_is_written_in_batches(
    tmp_path, tiny_pretrained, caplog, monkeypatch
):
    with caplog.at_level(logging.WARNING):
        overrides = ["prior.num_images=100000", "trainer.max_steps=3", "validation.enabled=false"]
        check_config(compose_train(overrides, tmp_path, tmp_path))
    assert "prior.num_images=100000 but 3 steps draw at most 3 class images" in caplog.text

    writes = []
    original = ClassImageCache.write_manifest
    monkeypatch.setattr(ClassImageCache, "write_manifest", lambda self, *a: writes.append(a) or original(self, *a))
    cache = ClassImageCache(str(tmp_path / "cache"), tiny_pretrained, {**SMALL_SAMPLER, "num_inference_steps": 1})
    assert cache.ensure("a teapot", 12) == 12
    assert len(writes) == 1  # once at the end (and every MANIFEST_EVERY images), not after each image
    manifest = json.loads((cache.folder("a teapot") / "manifest.json").read_text())
    assert manifest["images"] == [f"{i:05d}.png" for i in range(12)]


def test_class_images_are_remade_when_the_weights_at_the_same_path_change(tmp_path, tiny_pretrained):
    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    cache = ClassImageCache(str(tmp_path / "cache"), str(model), SMALL_SAMPLER)
    assert cache.ensure("a teapot", 2) == 2
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # other weights, same path
    assert cache.ensure("a teapot", 2) == 2


def test_a_saved_config_is_read_without_this_machines_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "secret-token-value")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("tags: ['${oc.env:SOME_API_TOKEN}']\nseed: 1\n")
    meta = provenance_from_config(saved_run_config(tmp_path))
    assert meta["tags"] == ["${oc.env:SOME_API_TOKEN}"] and meta["seed"] == 1


@pytest.mark.slow
def test_jobs_started_together_build_the_model_and_the_class_images_once(tmp_path):
    """Two runs on a fresh cache: one builds the tiny model and generates the class images, the other waits
    on the locks and reuses both; neither removes a file the other has in flight."""
    script = (
        "import logging; logging.basicConfig(level=logging.INFO); from hydra.utils import instantiate;"
        "from dreambooth_pl.util.config import resolve_path; from tests.conftest import FAST, compose_train;"
        f"cfg = compose_train(FAST, {str(tmp_path / 'run')!r}, {str(tmp_path / 'cache')!r});"
        "model = resolve_path(cfg.model.pretrained); print('model', model);"
        "print('generated', instantiate(cfg.prior.cache, pretrained=model).ensure('a teapot', 8))"
    )
    outputs = start_together([script, script], tmp_path)
    assert sum("Building a random-weight pipeline" in out for out in outputs) == 1, outputs
    assert sorted(int(out.split("generated ")[-1]) for out in outputs) == [0, 8], outputs
    (built,) = {out.split("model ")[-1].split()[0] for out in outputs}
    models = Path(built).parent
    assert [p.name for p in models.iterdir() if p.is_dir()] == [Path(built).name]  # no staging folder left
    assert len(list((tmp_path / "cache" / "class_images").glob("a_teapot-*/0*.png"))) == 8
