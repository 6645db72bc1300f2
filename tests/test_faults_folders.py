"""Where a run may write, checked before any work: a read-only run folder, a sweep folder or a job folder that
holds something else, and `paths.log_dir` in the project's source (docs/faults.md).

The tests run as root, whom permission bits do not stop (and `os.access` calls a 0555 folder writable). The
read-only cases therefore run the command as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
from the bounding set before exec): the folders are root's own, so their 0555/0444 bits apply as for any
user. An unprivileged uid cannot be used here: the interpreter lives under /root (0700)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DREAMBOOTH_ROOT, REPO
from tests.test_faults import records, saved_run, train_py
from tests.test_run_records import SAVED_CONFIG, refused, tree

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def drop_root_override() -> None:
    """In the child before exec: root keeps its uid but obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_plain_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    preexec = drop_root_override if os.geteuid() == 0 else None
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec
    )


@pytest.fixture
def read_only(tmp_path):
    """Make paths read-only for the test (restored after); skipped where this cannot stop a write."""
    made: list[Path] = []

    def make(*paths: Path) -> None:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
            made.append(path)
        probe = as_plain_user(["-c", f"open({str(made[0] / 'x' if made[0].is_dir() else made[0])!r}, 'a')"], tmp_path)
        if probe.returncode == 0:
            pytest.skip("a read-only folder is writable here (root with its capabilities kept)")

    yield make
    for path in made:
        path.chmod(0o755 if path.is_dir() else 0o644)


def stopped(result: subprocess.CompletedProcess, *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    for text in expected:
        assert text in output, output[-3000:]
    assert "Traceback" not in output and "Seed set" not in output and "Loading" not in output


def test_a_read_only_run_folder_is_named_before_any_work(tmp_path, read_only):
    """A new run into a read-only empty folder, into a missing folder under a read-only one, a resume of a
    read-only run folder and of one whose saved record is read-only: one line naming the folder (and the
    file), nothing changed."""
    empty, parent, run, record = (tmp_path / name for name in ("empty", "parent", "run", "record"))
    empty.mkdir()
    parent.mkdir()
    saved_run(run, SAVED_CONFIG, "- trainer.max_steps=3\n")
    saved_run(record, SAVED_CONFIG, "- trainer.max_steps=3\n")
    read_only(empty, parent, run, record / ".hydra" / "config.yaml")
    before = {folder: records(folder) for folder in (run, record)}

    result = as_plain_user([str(REPO / "train.py"), f"hydra.run.dir={empty}"], tmp_path)
    stopped(result, f"The run folder {empty} is read-only: {empty} cannot be written", "choose another hydra.run.dir")
    result = as_plain_user([str(REPO / "train.py"), f"hydra.run.dir={parent / 'new'}"], tmp_path)
    stopped(result, f"The run folder {parent / 'new'} is read-only: {parent} cannot be written")
    for folder, file in ((run, run), (record, record / ".hydra" / "config.yaml")):
        result = as_plain_user([str(REPO / "train.py"), f"hydra.run.dir={folder}", "ckpt_path=last"], tmp_path)
        stopped(result, f"The run folder {folder} is read-only: {file} cannot be written (Permission denied)")
        assert records(folder) == before[folder]
    assert list(empty.iterdir()) == [] and list(parent.iterdir()) == []


def test_an_evaluation_into_a_read_only_run_folder_is_named_before_any_model_loads(tmp_path, read_only):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    info = '{"subject": "teapot", "identifier": "sks", "class_noun": "teapot"}'  # all it needs to go on
    (run / "pipeline" / "dreambooth.json").write_text(info)
    read_only(run)
    before = records(run)
    args = ["-m", "dreambooth_pl.evaluate", f"run_dir={run}", f"paths.dreambooth_root={DREAMBOOTH_ROOT}"]
    result = as_plain_user([*args, "logger.wandb=null"], tmp_path)
    stopped(result, f"The evaluation's folder {run} is read-only", "pass output_dir=<a writable folder>")
    assert records(run) == before


SWEEP = ["-m", "seed=1,2", "trainer.max_steps=0"]  # a job would fail at once on max_steps: nothing trains


def test_a_sweep_into_a_folder_that_holds_something_else_is_refused(tmp_path):
    """The sweep folder, or a job folder in an earlier sweep's folder, holding unrelated content or a trained
    run: refused before any job starts, naming it; an earlier sweep's failed jobs are run again."""
    photos = tmp_path / "photos"
    (photos / "0").mkdir(parents=True)
    (photos / "0" / "keep.png").write_bytes(b"mine")
    refused([*SWEEP, f"hydra.sweep.dir={photos}"], tmp_path, f"hydra.sweep.dir={photos} is not empty and is not a")

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "1").mkdir()
    (sweep / "1" / "keep.png").write_bytes(b"mine")
    refused([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path, f"{sweep / '1'} is not empty and is not a run folder")
    (sweep / "1" / "keep.png").unlink()
    trained = saved_run(sweep / "0", SAVED_CONFIG, "- seed=1\n")
    (trained / "checkpoints").mkdir()
    (trained / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    expected = f"python train.py hydra.run.dir={trained} ckpt_path=last", "leave out hydra.sweep.dir"
    refused([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path, *expected)
    assert records(photos) == {"0/keep.png": b"mine"} and (trained / "checkpoints" / "last.ckpt").read_bytes()

    (trained / "checkpoints" / "last.ckpt").unlink()  # now an earlier sweep's failed job: run again
    for kept in ("report", "base/toy_teapot"):  # the report and a control row: the sweep's own, not job folders
        (sweep / kept).mkdir(parents=True)
        (sweep / kept / "keep.md").write_text("mine")
    output = train_py([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path, expect=1)
    assert f"[sweep] 2 job(s) of {sweep} failed" in output and "trainer.max_steps" in output
    assert (sweep / "report" / "keep.md").read_text() == (sweep / "base/toy_teapot/keep.md").read_text() == "mine"


@pytest.mark.parametrize(("folder", "sweep"), [("conf", False), ("conf/subject", False), (".", False), ("docs", True)])
def test_a_log_dir_in_the_projects_source_is_refused(tmp_path, folder, sweep):
    target = (REPO / folder).resolve()
    name = folder.split("/")[0] if folder != "." else "conf"
    before = sorted(p.name for p in REPO.iterdir()), tree(REPO / name)
    args = [*SWEEP, "sweep_name=x"] if sweep else ["trainer.max_steps=0"]  # without the check: fails at once
    relation = "holds" if folder == "." else "is in"
    refused([*args, f"paths.log_dir={target}"], tmp_path, f"paths.log_dir={target} {relation} the project's {name}/")
    assert (sorted(p.name for p in REPO.iterdir()), tree(REPO / name)) == before
