"""Checkpoints a cluster job can trust: written whole, chosen readable on resume, saved when preempted."""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.files import atomic_file

log = logging.getLogger(__name__)


# other values of ckpt_path that Lightning resolves itself
LIGHTNING_SPECIAL = ("best", "hpc", "registry")


class CheckpointError(ConfigError):
    """A checkpoint file cannot be read."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its final name and rename it only when complete.

    Lightning's own writer stages the file in $TMPDIR and moves it, which across filesystems is a copy:
    a full disk (or a kill) in the middle leaves a truncated `last.ckpt` that every resume then fails on.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path, fsync=True) as handle:
            torch.save(checkpoint, handle)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with `last.ckpt` always the run's newest step.

    Configured (conf/callbacks/default.yaml) to overwrite `last.ckpt` in place (no `last-v1.ckpt` beside a
    resumed run's older one) and to keep no other file unless asked (`save_top_k`). Lightning saves the
    last step at the end only when no periodic checkpoint was written before; here the final step is always
    saved, so "train further" from `last.ckpt` starts where the run ended.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_step(path: str | Path, option: str = "ckpt_path") -> int:
    """The training step a checkpoint holds; CheckpointError if the file is not a whole Lightning checkpoint.

    Memory-mapped, so only the archive's index is read, not gigabytes of weights.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception as err:  # torch raises many types, and its hints (weights_only=False) must not reach users
        reason = "not a Lightning checkpoint" if isinstance(err, (KeyError, TypeError)) else type(err).__name__
        raise CheckpointError(
            f"{option}={str(path)!r} is not a readable checkpoint ({reason}: truncated, or not written by "
            "this project). Pass another .ckpt, or ckpt_path=last to take the newest readable one."
        ) from None


def check_checkpoint_fits(ckpt_path: str | None, module: L.LightningModule) -> None:
    """A checkpoint of another architecture (an SDXL one in an SD run, allowed in by ckpt_allow_mismatch=true)
    is refused before training, with its first misfit named, rather than with a state-dict traceback."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
    own = module.state_dict()
    unfit = [key for key, value in saved.items() if key not in own or own[key].shape != value.shape]
    if unfit:
        key = unfit[0]
        detail = "not in this model" if key not in own else f"{tuple(saved[key].shape)}, here {tuple(own[key].shape)}"
        raise CheckpointError(
            f"ckpt_path={str(ckpt_path)!r} holds another model's weights: {len(unfit)} of its {len(saved)} tensors "
            f"do not fit this model (first: {key}: {detail}). ckpt_allow_mismatch=true allows other settings, "
            "not another architecture."
        )


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path, output_dir: str | Path) -> str | None:
    """What `trainer.fit` should resume from, checked before any expensive work.

    "last" is the newest checkpoint that can be read, among `checkpoint_dir/*.ckpt` and the SLURM requeue
    checkpoints Lightning writes to `output_dir/hpc_ckpt_*.ckpt`; an unreadable one (a truncated write from
    before this project wrote checkpoints whole, a bad copy) is skipped with a warning. None when there is
    no checkpoint yet, so `ckpt_path=last` is safe in every job script.
    """
    if ckpt_path is None or ckpt_path in LIGHTNING_SPECIAL:
        return ckpt_path
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"ckpt_path={ckpt_path!r}: no such file.")
        checkpoint_step(ckpt_path)
        return str(ckpt_path)
    candidates = [*Path(checkpoint_dir).glob("*.ckpt"), *Path(output_dir).glob("hpc_ckpt_*.ckpt")]
    candidates = sorted((p for p in candidates if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    unreadable = []
    for path in reversed(candidates):
        try:
            step = checkpoint_step(path)
        except CheckpointError as err:
            log.warning("Skipping %s", err)
            unreadable.append(path.name)
            continue
        log.info("ckpt_path=last: resuming from %s (step %d)", path, step)
        return str(path)
    if unreadable:
        raise CheckpointError(
            f"ckpt_path=last: no checkpoint in {checkpoint_dir} can be read ({', '.join(unreadable)}). "
            "Remove them to start afresh."
        )
    log.info("ckpt_path=last: no checkpoint in %s yet; starting from the pretrained model", checkpoint_dir)
    return None


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (how SLURM and Kubernetes preempt a job), save a checkpoint at the current step and
    exit with `exit_code` instead of Lightning's 0, so a job script sees that the run did not finish.

    Lightning stops at the end of the step during which the signal came; `ckpt_path=last` then resumes
    exactly where an uninterrupted run would be, wherever in the step or the epoch the signal landed.
    """

    def __init__(self, dirpath: str, filename: str = "last", exit_code: int = 143):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.exit_code = exit_code
        self._signalled = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under DDP, replace Lightning's SIGTERM handler (registered before this hook) with one that only
        notes the signal. Lightning's issues a broadcast from inside the handler, which can pair with whatever
        collective the other ranks are in, and its end-of-batch check reads each rank's own flag, so ranks that
        see the signal a batch apart stop a batch apart; the ranks then agree in `on_train_batch_end`."""
        if trainer.world_size == 1:
            return
        launcher = trainer.strategy.launcher

        def note(signum, frame) -> None:
            if not self._signalled and launcher is not None:
                launcher.kill(signum)  # rank 0 passes it on to the ranks it started, as Lightning's does
            self._signalled = True

        signal.signal(signal.SIGTERM, note)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # One all-reduce a batch: a signal seen by any rank stops every rank at the end of this same batch.
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        with as_of_last_batch(trainer):
            trainer.save_checkpoint(self.path)
        log.error(
            "Stopped by SIGTERM at step %d; saved %s. Resume with ckpt_path=last in the same run folder.",
            trainer.global_step,
            self.path,
        )
        exception.code = self.exit_code


@contextmanager
def as_of_last_batch(trainer: L.Trainer):
    """The loops' progress as Lightning's own checkpoint at the end of the last batch records it.

    A signal during an epoch's last batch (or its end hooks) stops the run only after the epoch is counted
    complete. Lightning's restore does not expect that state: it resumes the next epoch as if that epoch's
    first batches were done, ends it early and shifts every later epoch's data order, so the resumed weights
    differ. Mid-epoch stops, raised just after a batch, are left as they are.
    """
    fit = trainer.fit_loop
    epochs, batches = fit.epoch_progress, fit.epoch_loop.batch_progress
    if not 0 < epochs.current.ready == epochs.current.processed:
        yield
        return
    counters = [(t, "processed") for t in (epochs.current, epochs.total)]
    counters += [(t, "completed") for t in (epochs.current, epochs.total, batches.current, batches.total)]
    counters += [(fit.epoch_loop, "_batches_that_stepped")]
    for owner, name in counters:
        setattr(owner, name, getattr(owner, name) - 1)
    try:
        yield
    finally:
        for owner, name in counters:
            setattr(owner, name, getattr(owner, name) + 1)
