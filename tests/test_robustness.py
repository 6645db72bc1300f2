"""Crashes, kills and resume: nothing half-written is ever used, and resumed runs match uninterrupted ones."""

from __future__ import annotations

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

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_pl.class_images import ClassImageCache
from dreambooth_pl.export import recover_leftovers, write_dir_atomically
from dreambooth_pl.generate import generate
from dreambooth_pl.images import is_readable_image, save_atomically
from dreambooth_pl.module import DreamBoothModule
from dreambooth_pl.training import train
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset

RESUME_RUN = [
    *FAST,
    "trainer.max_steps=150",
    "callbacks.checkpoint.every_n_train_steps=23",  # 5 steps an epoch: checkpoints fall mid-epoch
    "export.samples.prompts=[]",
    "data.random_flip=true",
    "data.center_crop=false",
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


@needs_dataset
def test_killed_run_resumes_to_the_same_weights(tmp_path, cache_dir):
    """SIGKILL mid-epoch, then `ckpt_path=last` in the same run folder: same final UNet as no kill."""
    common = [*RESUME_RUN, f"paths.cache_dir={cache_dir}", f"paths.dreambooth_root={DREAMBOOTH_ROOT}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = train_py([*common, f"hydra.run.dir={straight}"], tmp_path / "straight.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    proc = train_py([*common, f"hydra.run.dir={killed}"], tmp_path / "killed.log")
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "pipeline").exists(), "the run finished before it could be killed"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 150 and step % 5, f"checkpoint at step {step} should be mid-epoch (5 steps an epoch)"

    proc = train_py([*common, f"hydra.run.dir={killed}", "ckpt_path=last"], tmp_path / "resumed.log")
    proc.wait(timeout=600)
    out = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "Restored all states" in out

    a, b = unet_weights(straight), unet_weights(killed)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed weights differ by {worst}"


def test_killed_class_image_generation_leaves_only_complete_images(tmp_path, tiny_pretrained):
    script = (
        "import sys; from dreambooth_pl.class_images import ClassImageCache;"
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
    cfg = compose_train([*FAST, "trainer.max_steps=10"], tmp_path, cache_dir)
    with pytest.raises(FloatingPointError, match="at step 3; the last good state is saved in .*last-good.ckpt"):
        train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last-good.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "pipeline").exists()  # no garbage model is exported


def test_source_never_unpickles_or_runs_remote_code():
    source = "\n".join(p.read_text() for p in (REPO / "dreambooth_pl").glob("*.py"))
    assert "trust_remote_code" not in source
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call


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


def test_two_runs_sharing_a_class_image_cache_generate_each_image_once(tmp_path, tiny_pretrained):
    script = (
        "from dreambooth_pl.class_images import ClassImageCache;"
        f"cache = ClassImageCache({str(tmp_path / 'cache')!r}, {tiny_pretrained!r}, "
        "{'num_inference_steps': 2, 'resolution': 32, 'batch_size': 1});"
        "print('generated', cache.ensure('a teapot', 8))"
    )
    outputs = start_together([script, script], tmp_path)
    counts = sorted(int(out.split("generated ")[-1]) for out in outputs)
    assert counts == [0, 8], outputs  # one process generated, the other waited on the lock and reused
    folder = ClassImageCache(str(tmp_path / "cache"), tiny_pretrained, {"resolution": 32}).cache_dir
    assert len(list(folder.glob("a_teapot-*/0*.png"))) == 8


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
        recover_leftovers(target)  # what the next export does first
        outcomes.add(_export_version(target))
        assert _export_version(target) in ("old", "new"), f"killed before operation {step}"
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
