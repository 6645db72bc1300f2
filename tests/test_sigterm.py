"""SIGTERM, then `ckpt_path=last`: the resumed run ends with the uninterrupted run's weights, bit for bit, and
its log rows, wherever in a step or an epoch the signal lands."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from dreambooth_pl.runs.csv_logger import ResumableCSVLogger
from dreambooth_pl.training import callbacks as sample_grids
from dreambooth_pl.training.job import train
from tests.conftest import FAST, compose_train

# 5 photos: 5 steps an epoch (2 with accumulation over 2 batches, plus the final single batch), so steps 5
# and 10 end an epoch; a sample grid every 5 steps falls on those boundaries.
SIGNAL_RUN = [
    *FAST,
    "trainer.max_steps=12",
    "export.enabled=false",
    "data.random_flip=true",
    "data.center_crop=false",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_steps=5",
]
ACCUMULATE = ["trainer.accumulate_grad_batches=2", "trainer.max_steps=7"]


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class SigtermAt(L.Callback):
    """Fault injection: the process sends itself SIGTERM in `hook` when the run is at `step`."""

    def __init__(self, step: int, hook: str):
        self.step, self.hook = step, hook

    def fire(self, trainer: L.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            sigterm()

    def on_train_start(self, trainer, *_):
        self.fire(trainer, "on_train_start")

    def on_train_batch_start(self, trainer, *_):
        self.fire(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, *_):
        self.fire(trainer, "on_before_optimizer_step")

    def on_train_batch_end(self, trainer, *_):
        self.fire(trainer, "on_train_batch_end")

    def on_train_epoch_end(self, trainer, *_):
        self.fire(trainer, "on_train_epoch_end")


def run(out: Path, cache_dir: Path, overrides: list[str], signal_at: tuple[int, str] | None = None) -> int:
    """train.py's job in this process; its exit code (0 when it returns)."""
    if signal_at is not None:
        step, hook = signal_at
        overrides = [*overrides, f"+callbacks.sigterm={{_target_:{__name__}.SigtermAt,step:{step},hook:{hook}}}"]
    cfg = compose_train([*SIGNAL_RUN, *overrides], out, cache_dir)
    try:
        train(cfg)
    except SystemExit as stop:
        return stop.code
    return 0


def final_state(run_dir: Path) -> tuple[dict, list[dict]]:
    """The weights `checkpoints/last.ckpt` holds and the run's CSV log rows."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as rows:
        return checkpoint["state_dict"], list(csv.DictReader(rows))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The reference runs, one per setting, made when first asked for; with `ckpt_path=last`, as a job script
    starts every time: a new folder has no checkpoint and starts from the pretrained model."""
    made = {}

    def reference(overrides: tuple[str, ...]) -> tuple[dict, list[dict]]:
        if overrides not in made:
            out = tmp_path_factory.mktemp("uninterrupted")
            assert run(out, cache_dir, [*overrides, "ckpt_path=last"]) == 0
            made[overrides] = final_state(out)
        return made[overrides]

    return reference


def signal_in(monkeypatch, owner, name: str, when) -> None:
    """SIGTERM from inside `owner.name`, on its first call for which `when(*args)` holds."""
    original, fired = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(sigterm())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# name: (signal hook and step, or None for a patched point; overrides; the step last.ckpt holds). All but the
# first two are marked slow: about 10 s each on a busy 2-core machine.
CASES = {
    "at an epoch boundary": ((5, "on_train_epoch_end"), [], 5),
    "during a sample grid at an epoch boundary": (None, [], 5),
    "before the first step": ((0, "on_train_start"), [], 1),
    "at the start of a step mid-epoch": ((3, "on_train_batch_start"), [], 4),
    "during the optimizer step": ((7, "on_before_optimizer_step"), [], 8),
    "after the last batch of an epoch": ((10, "on_train_batch_end"), [], 10),
    "during the last step": ((11, "on_before_optimizer_step"), [], 12),
    "while logging a step": (None, [], 7),
    "inside a gradient-accumulation window": ((1, "on_train_batch_start"), ACCUMULATE, 1),
    "at the last step of an accumulated epoch": ((3, "on_train_epoch_end"), ACCUMULATE, 3),
}


@pytest.mark.parametrize("case", [c if i < 2 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(CASES)])
def test_sigterm_anywhere_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir, uninterrupted, monkeypatch, case):
    signal_at, overrides, saved_step = CASES[case]
    if case.startswith("during a sample grid"):
        signal_in(monkeypatch, sample_grids, "render", lambda *args: True)
    if case.startswith("while logging"):
        signal_in(monkeypatch, ResumableCSVLogger, "log_metrics", lambda self, metrics, step=None: step == 6)
    weights, rows = uninterrupted(tuple(overrides))

    assert run(tmp_path, cache_dir, overrides, signal_at) == 143
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved_step
    monkeypatch.undo()
    assert run(tmp_path, cache_dir, [*overrides, "ckpt_path=last"]) == 0
    resumed_weights, resumed_rows = final_state(tmp_path)
    assert weights.keys() == resumed_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], resumed_weights[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
    assert resumed_rows == rows
