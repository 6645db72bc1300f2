"""Resuming continues the experiment that was started, not whatever the defaults say today.

Hydra writes `<run>/.hydra/` before the job starts, so this is a Hydra callback (conf/hydra/default.yaml):
`on_run_start` is the last moment to take the run folder's lock (one run per folder), to keep the earlier
record (copied to `.hydra/history/<n>/`) and, when `ckpt_path` resumes in the run's own folder, to load the
run's saved overrides with the new ones on top. `ckpt_path=<run>/checkpoints/<file>` trains that run
further in its own folder unless `hydra.run.dir` is given. A checkpoint of another model, method or subject
than the one asked for is refused unless `ckpt_allow_mismatch=true`. A run folder may come from someone
else: what its saved config would instantiate must be on `trusted_targets`. Only light imports here: Hydra
loads this module for every command.
"""

from __future__ import annotations

import atexit
import fnmatch
import logging
import shutil
from pathlib import Path

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from dreambooth_pl.util.config import ConfigError, exit_on_config_error
from dreambooth_pl.runs.files import ProcessLock

log = logging.getLogger(__name__)

# what a checkpoint belongs to: resuming it under other values would silently change the experiment
IDENTITY = ("model.name", "model.pretrained", "method.name", "subject.name", "subject.instance_dir")
RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
RUN_LOCK = ".run.lock"  # in the run folder: the pid of the run using it
CODE_KEYS = ("_target_", "scheduler")  # keys whose value names Python code to import (scheduler: a class path)


def read_record(path: Path) -> DictConfig | ListConfig:
    """A saved Hydra file, or a ConfigError naming it (a resume must never go on with the defaults)."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's and OmegaConf's many error types
        raise ConfigError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Restore it from .hydra/history/, or start a new run folder."
        ) from None


def code_targets(cfg: DictConfig | ListConfig, prefix: str = "") -> list[tuple[str, str]]:
    """Every (dotted key, value) of the config that names code: `_target_`s and scheduler class paths."""
    found = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            found += code_targets(node, path)
        elif key in CODE_KEYS:
            try:
                value = cfg[key]
            except Exception:  # an interpolation that does not resolve: judged by its text
                value = node._value()
            if isinstance(value, str) and (key == "_target_" or "." in value):
                found.append((path, value))
    return found


def check_trusted(cfg: DictConfig, trusted: list[str], source: Path) -> None:
    """Refuse, before anything is imported, a config whose code is not the project's or its libraries'."""
    targets = [(k, v) for k, v in code_targets(cfg) if not k.startswith("hydra.")]  # the job's, not Hydra's own
    untrusted = [(k, v) for k, v in targets if not any(fnmatch.fnmatchcase(v, p) for p in trusted)]
    if untrusted:
        raise ConfigError(
            f"{source} asks to run code that is not this project's or its libraries': "
            + ", ".join(f"{key}={value!r}" for key, value in untrusted)
            + ". Not resuming. If you trust this run folder, add the target to "
            "hydra.callbacks.run_record.trusted_targets."
        )


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """The saved overrides with each new one replacing the saved ones for the same key (at the first one's
    place: a saved `+key=...` may come before), then the new keys."""
    parser = OverridesParser.create()

    def key(override: str) -> str:
        return parser.parse_override(override).key_or_group

    replaced = {key(o): o for o in new}
    merged, placed = [], set()
    for override in saved:
        name = key(override)
        if name not in replaced:
            merged.append(override)
        elif name not in placed:  # later saved values of the key (`a=1 ... a=2`) must not win over the new one
            merged.append(replaced[name])
            placed.add(name)
    return merged + [o for o in replaced.values() if key(o) not in placed]


def identity(cfg: DictConfig) -> dict:
    """The IDENTITY values as written in the config (unresolved: `${paths...}` stays a reference)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    values = {}
    for dotted in IDENTITY:
        node = container
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[dotted] = node
    return values


def check_same_experiment(saved: DictConfig, asked: DictConfig, ckpt_path: str, run_dir: Path) -> None:
    before, now = identity(saved), identity(asked)
    changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in IDENTITY if before[k] != now[k]]
    if changed and not asked.get("ckpt_allow_mismatch"):
        raise ConfigError(
            f"ckpt_path={ckpt_path} continues the run in {run_dir}, which was trained with other settings:\n  "
            + "\n  ".join(changed)
            + "\nDrop those overrides to resume it as it was, or pass ckpt_allow_mismatch=true to train the "
            "checkpoint on the new settings anyway."
        )


def run_dir_given(config: DictConfig) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in config.hydra.overrides.hydra)


def checkpoint_run_dir(ckpt_path: str, run_dir: Path) -> Path | None:
    """The run folder a checkpoint belongs to: `last` is this run's, a file is `<run>/checkpoints/<file>`."""
    if ckpt_path in ("last", "hpc", "registry"):
        return run_dir
    folder = Path(ckpt_path).expanduser().resolve().parent.parent
    return folder if (folder / ".hydra" / "config.yaml").is_file() else None


class RunRecord(Callback):
    """One run per folder; keep every invocation's record of it and resume with the run's own config."""

    def __init__(self, trusted_targets: list[str] | None = None) -> None:
        self.trusted = list(trusted_targets or [])
        self.notes: list[str] = []
        self.lock: ProcessLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_config_error(lambda: self.prepare(config))

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if self.lock is not None:
            self.lock.release()

    def prepare(self, config: DictConfig) -> None:
        ckpt_path = config.get("ckpt_path")
        run_dir = self.run_folder(config, ckpt_path)
        record = run_dir / ".hydra"
        if config.hydra.output_subdir is not None:  # DDP's other ranks (None) run inside rank 0's lock
            self.take(run_dir)
        source = checkpoint_run_dir(str(ckpt_path), run_dir) if ckpt_path else None
        resumed = None
        if source is not None and (source / ".hydra" / "config.yaml").is_file():
            saved = read_record(source / ".hydra" / "config.yaml")
            if source == run_dir and (record / "overrides.yaml").is_file():
                new = list(config.hydra.overrides.task)
                merged = merge_overrides(list(read_record(record / "overrides.yaml")), new)
                resumed = self.compose(config, merged, record / "overrides.yaml")
                check_trusted(resumed, self.trusted, record / "overrides.yaml")
                check_same_experiment(saved, resumed, ckpt_path, run_dir)
                self.notes.append(f"Resuming {run_dir} with its saved config; overrides on top: {' '.join(new)}")
            else:
                check_same_experiment(saved, config, ckpt_path, source)
        if config.hydra.output_subdir is not None and (record / "config.yaml").is_file():  # DDP's other ranks: None
            self.keep_record(record)
        if resumed is not None:
            self.use_config(config, resumed, merged)

    def run_folder(self, config: DictConfig, ckpt_path: str | None) -> Path:
        """The run folder: `ckpt_path=<run>/checkpoints/<file>` continues that run there (and in its W&B run)
        unless `hydra.run.dir` is given."""
        run_dir = Path(config.hydra.run.dir).resolve()
        owner = checkpoint_run_dir(str(ckpt_path), run_dir) if ckpt_path else None
        if owner is None or owner == run_dir or run_dir_given(config):
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
        history = record / "history"
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
