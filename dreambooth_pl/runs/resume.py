"""Resuming continues the experiment that was started, not whatever the defaults say today.

Hydra writes `<run>/.hydra/` before the job starts, so this is a Hydra callback (conf/hydra/default.yaml):
`on_run_start` is the last moment to refuse a run folder that would lose data (`run_folders.py`), to take
its lock (one run per folder), to keep the earlier record (copied to `.hydra/history/<n>/`) and, when
`ckpt_path` resumes in the run's own folder, to load the run's saved overrides with the new ones on top.
`ckpt_path=<run>/checkpoints/<file>` trains that run further in its own folder unless `hydra.run.dir` is
given. A checkpoint of another model, method or subject than the one asked for is refused unless
`ckpt_allow_mismatch=true`. A run folder may come from someone else: its saved overrides are data checked
against the project's own configs (`closed_world`), and any problem with them stops the run before anything
is written. Only light imports here: Hydra loads this module for every command.
"""

from __future__ import annotations

import atexit
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dreambooth_pl.runs.layout import (
    HYDRA_DIR,
    HYDRA_HISTORY,
    RECORD_FILES,
    RUN_LOCK,
    SAVED_CONFIG,
    SAVED_OVERRIDES,
    saved_config,
)
from dreambooth_pl.runs.records import load_mapping, load_record, select
from dreambooth_pl.runs.run_folders import (
    check_closed_world,
    check_env_reads,
    check_run_folder,
    check_sweep_folder,
    path_roots,
)
from dreambooth_pl.util.config import CONF_DIR, ConfigError, exit_on_config_error
from dreambooth_pl.util.files import ProcessLock

log = logging.getLogger(__name__)

# what a checkpoint belongs to: resuming it under other values would silently change the experiment
IDENTITY = ("model.name", "model.pretrained", "method.name", "subject.name", "subject.instance_dir")


def saved_overrides(path: Path) -> list[str]:
    """`.hydra/overrides.yaml` as the list of strings Hydra writes, or a ConfigError naming it."""
    overrides = load_record(path)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path} is not a list of overrides (key=value strings). Not resuming.")
    return overrides


def override_key(override: str) -> str:
    """The key or group an override sets; its text when it does not parse (the closed world names it)."""
    try:
        return OverridesParser.create().parse_override(override).key_or_group
    except Exception:  # the grammar's errors
        return override


def superseded(key: str, new_keys: set[str]) -> bool:
    """A saved key the command sets again, itself or a node above it (`callbacks.sigterm=null` drops a saved
    `callbacks.sigterm._target_=...`)."""
    return any(key == k or key.startswith(k + ".") for k in new_keys)


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """The saved overrides with each new one replacing the saved ones for the same key (at the first one's
    place: a saved `+key=...` may come before) and those under it, then the new keys."""
    replaced = {override_key(o): o for o in new}
    merged, placed = [], set()
    for override in saved:
        name = override_key(override)
        if name in replaced and name not in placed:  # later saved values (`a=1 ... a=2`) must not win over the new one
            merged.append(replaced[name])
            placed.add(name)
        elif not superseded(name, set(replaced)):
            merged.append(override)
    return merged + [o for o in replaced.values() if override_key(o) not in placed]


def identity(cfg: DictConfig | dict) -> dict:
    """The IDENTITY values as written in the config (unresolved: `${paths...}` stays a reference)."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
    return {dotted: select(container, dotted) for dotted in IDENTITY}


def check_same_experiment(saved: dict, asked: DictConfig, ckpt_path: str, run_dir: Path) -> None:
    before, now = identity(saved), identity(asked)
    changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in IDENTITY if before[k] != now[k]]
    if changed and not asked.get("ckpt_allow_mismatch"):
        raise ConfigError(
            f"ckpt_path={ckpt_path} continues the run in {run_dir}, which was trained with other settings:\n  "
            + "\n  ".join(changed)
            + "\nDrop those overrides to resume it as it was, or pass ckpt_allow_mismatch=true to train the "
            "checkpoint on the new settings anyway."
        )


def hydra_override_given(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == key for o in config.hydra.overrides.hydra)


def stop_on_error(job: Callable[[], None]) -> None:
    """A callback's problem stops the command with its message: Hydra would only warn and go on (a resume
    with the default recipe)."""

    def checked() -> None:
        try:
            job()
        except ConfigError:
            raise
        except Exception as err:
            message = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"Not starting: {type(err).__name__}: {message}") from None

    exit_on_config_error(checked)


def checkpoint_run_dir(ckpt_path: str, run_dir: Path) -> Path | None:
    """The run folder a checkpoint belongs to: `last` is this run's, a file is `<run>/checkpoints/<file>`."""
    if ckpt_path in ("last", "hpc", "registry"):
        return run_dir
    folder = Path(ckpt_path).expanduser().resolve().parent.parent
    return folder if saved_config(folder).is_file() else None


class RunFolder(Callback):
    """One run per folder; keep every invocation's record of it and resume with the run's own config."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.lock: ProcessLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        stop_on_error(lambda: self.prepare(config))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """A sweep's folder and the job folders already in it: a run folder's rules, before Hydra writes
        `multirun.yaml` and before any job trains."""

        def check() -> None:
            check_env_reads(config)
            given = hydra_override_given(config, "hydra.sweep.dir")
            check_sweep_folder(config, Path(config.hydra.sweep.dir).resolve(), default_dir=not given)

        stop_on_error(check)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if self.lock is not None:
            self.lock.release()

    def prepare(self, config: DictConfig) -> None:
        """Every check first; then the lock, the history copy and the resumed config (Hydra then writes)."""
        check_env_reads(config)
        ckpt_path = config.get("ckpt_path")
        asked = Path(config.hydra.run.dir).resolve()
        run_dir = self.run_folder(config, ckpt_path)
        source = checkpoint_run_dir(str(ckpt_path), run_dir) if ckpt_path else None
        primary = config.hydra.output_subdir is not None  # DDP's other ranks (None) run inside rank 0's lock
        if primary:
            default_dir = run_dir == asked and not hydra_override_given(config, "hydra.run.dir")  # conf/hydra's
            check_run_folder(config, run_dir, resuming=source == run_dir, default_dir=default_dir)
        record = run_dir / HYDRA_DIR
        resumed = None
        if source is not None and (source / HYDRA_DIR).is_dir():  # a record without its config.yaml: named, refused
            saved = load_mapping(saved_config(source))
            if source == run_dir:
                resumed, merged = self.resume(config, record / SAVED_OVERRIDES, run_dir)
                check_same_experiment(saved, resumed, ckpt_path, run_dir)
                new = " ".join(config.hydra.overrides.task)
                self.notes.append(f"Resuming {run_dir} with its saved config; overrides on top: {new}")
            else:
                check_same_experiment(saved, config, ckpt_path, source)
        if primary:
            self.take(run_dir)
            if (record / SAVED_CONFIG).is_file():
                self.keep_record(record)
        if resumed is not None:
            self.use_config(config, resumed, merged)

    def resume(self, config: DictConfig, source: Path, run_dir: Path) -> tuple[DictConfig, list[str]]:
        """The run's saved overrides, checked against the project's configs, with the new ones on top: the
        composed config and the overrides it was composed from."""
        if not source.is_file():
            raise ConfigError(f"{source} is missing: the run's settings are unknown. Not resuming with the defaults.")
        saved, new = saved_overrides(source), list(config.hydra.overrides.task)
        kept = [None if superseded(override_key(o), set(map(override_key, new))) else o for o in saved]
        merged = merge_overrides(saved, new)
        groups = [o for o in merged if (CONF_DIR / override_key(o)).is_dir()]
        check_closed_world(kept, source, lambda: self.compose(config, groups, source), run_dir, path_roots(config))
        return self.compose(config, merged, source), merged

    def run_folder(self, config: DictConfig, ckpt_path: str | None) -> Path:
        """The run folder: `ckpt_path=<run>/checkpoints/<file>` continues that run there (and in its W&B run)
        unless `hydra.run.dir` is given."""
        run_dir = Path(config.hydra.run.dir).resolve()
        owner = checkpoint_run_dir(str(ckpt_path), run_dir) if ckpt_path else None
        if owner is None or owner == run_dir or hydra_override_given(config, "hydra.run.dir"):
            return run_dir
        with read_write(config):
            config.hydra.run.dir = str(owner)
        self.notes.append(
            f"ckpt_path={ckpt_path} is a checkpoint of the run in {owner}: training that run further, in its "
            "folder and W&B run (pass hydra.run.dir=<folder> to start a new run from the checkpoint instead)"
        )
        return owner

    def take(self, run_dir: Path) -> None:
        """The run folder's lock, held until the process ends; another run there is refused at once."""
        lock = ProcessLock(run_dir / RUN_LOCK, "the run folder")
        if not lock.try_acquire():
            raise ConfigError(
                f"{run_dir} is in use by another run (pid {lock.holder() or 'unknown'}): one run per folder. "
                "Wait for it to end, or choose another hydra.run.dir."
            )
        self.lock = lock
        atexit.register(lock.release)  # also when the job fails or is stopped (SIGTERM); SIGKILL leaves its pid

    @staticmethod
    def compose(config: DictConfig, overrides: list[str], source: Path) -> DictConfig:
        try:
            return compose(config.hydra.job.config_name, overrides=overrides, return_hydra_config=True)
        except Exception as err:  # Hydra's override and composition errors
            raise ConfigError(f"{source}: its saved overrides do not compose: {err}") from None

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # a sweep's job folder is a run folder too: one run in it
            exit_on_config_error(lambda: self.take(Path(config.hydra.runtime.output_dir)))
        for note in self.notes:  # Hydra's logging is configured only now
            log.info(note)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and self.lock is not None:  # the sweep's next job takes its own
            self.lock.release()
            self.lock = None

    def keep_record(self, record: Path) -> None:
        history = record / HYDRA_HISTORY
        target = history / str(len(list(history.glob("*"))) if history.is_dir() else 0)
        try:
            target.mkdir(parents=True)
            for name in RECORD_FILES:
                if (record / name).is_file():
                    shutil.copy2(record / name, target / name)
        except OSError as err:  # Hydra would overwrite the record next: stop instead
            raise ConfigError(f"Cannot keep the record of {record} in {target} ({err}); not starting.") from None
        self.notes.append(f"The earlier record of this run folder is kept in {target}")

    @staticmethod
    def use_config(config: DictConfig, resumed: DictConfig, overrides: list[str]) -> None:
        """Make the resumed composition the job's config; Hydra then saves and runs it."""
        with read_write(config), open_dict(config):
            for key in [k for k in config if k != "hydra"]:
                del config[key]
            for key in resumed:
                if key != "hydra":
                    config[key] = resumed[key]
            config.hydra.overrides.task = overrides
            config.hydra.runtime.choices = resumed.hydra.runtime.choices
