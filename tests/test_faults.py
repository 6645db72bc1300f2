"""Faults and crafted input, round two: run folders that cannot run code, one run per folder, locks that say
what they wait for, sweeps that survive a failed job, every bad value and file named before any work."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth_pl.files import ProcessLock
from tests.conftest import REPO

HOLD_LOCK = "import sys, time; from dreambooth_pl.files import ProcessLock; ProcessLock(sys.argv[1], 'x').acquire(); "


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
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".run.lock"}


def test_a_crafted_run_folder_cannot_run_code(tmp_path):
    """A shared run folder whose saved overrides instantiate os.system: refused before any work, naming the
    file, the key and the target; nothing runs and nothing in the folder changes."""
    run = tmp_path / "downloaded-run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (run / ".hydra" / "overrides.yaml").write_text("- model.vae={_target_:os.system,command:'touch pwned'}\n")
    before = records(run)
    output = train_py([f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, expect=1)
    assert f"{run / '.hydra' / 'overrides.yaml'} asks to run code" in output
    assert "model.vae._target_='os.system'" in output and "Traceback" not in output
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    assert records(run) == before  # no .hydra rewritten, no history copy, no class image


def test_an_unreadable_saved_config_stops_the_resume_naming_it(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {name: toy\n  : [\x00garbage")
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
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
    assert f"Took over {run / '.run.lock'} (the run folder) from pid {holder.pid}, which is no longer running" in output
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
