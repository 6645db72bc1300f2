"""Resuming continues the experiment that was started, not whatever the defaults say today.

Hydra writes `<run>/.hydra/` before the job starts, so this is a Hydra callback (conf/hydra/default.yaml):
`on_run_start` is the last moment to keep the earlier record (copied to `.hydra/history/<n>/`) and, when
`ckpt_path` resumes in the run's own folder, to load the run's saved overrides with the new ones on top.
A checkpoint of another model, method or subject than the one asked for is refused unless
`ckpt_allow_mismatch=true`. Only light imports here: Hydra loads this module for every command.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dreambooth_pl.config_utils import ConfigError, exit_on_config_error

log = logging.getLogger(__name__)

# what a checkpoint belongs to: resuming it under other values would silently change the experiment
IDENTITY = ("model.name", "model.pretrained", "method.name", "subject.name", "subject.instance_dir")
RECORD_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """The saved overrides with each new one replacing the saved one for the same key, then the new keys."""
    parser = OverridesParser.create()

    def key(override: str) -> str:
        return parser.parse_override(override).key_or_group

    replaced = {key(o): o for o in new}
    merged = [replaced.pop(key(o), o) for o in saved]
    return merged + [o for o in new if key(o) in replaced]


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


def checkpoint_run_dir(ckpt_path: str, run_dir: Path) -> Path | None:
    """The run folder a checkpoint belongs to: `last` is this run's, a file is `<run>/checkpoints/<file>`."""
    if ckpt_path in ("last", "hpc", "registry"):
        return run_dir
    folder = Path(ckpt_path).expanduser().resolve().parent.parent
    return folder if (folder / ".hydra" / "config.yaml").is_file() else None


class RunRecord(Callback):
    """Keep every invocation's record of a run folder and resume with the run's own config."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_config_error(lambda: self.prepare(config))

    def prepare(self, config: DictConfig) -> None:
        run_dir = Path(config.hydra.run.dir).resolve()
        record = run_dir / ".hydra"
        ckpt_path = config.get("ckpt_path")
        source = checkpoint_run_dir(str(ckpt_path), run_dir) if ckpt_path else None
        resumed = None
        if source is not None and (source / ".hydra" / "config.yaml").is_file():
            saved = OmegaConf.load(source / ".hydra" / "config.yaml")
            if source == run_dir and (record / "overrides.yaml").is_file():
                new = list(config.hydra.overrides.task)
                merged = merge_overrides(list(OmegaConf.load(record / "overrides.yaml")), new)
                resumed = compose(config.hydra.job.config_name, overrides=merged, return_hydra_config=True)
                check_same_experiment(saved, resumed, ckpt_path, run_dir)
                self.notes.append(f"Resuming {run_dir} with its saved config; overrides on top: {' '.join(new)}")
            else:
                check_same_experiment(saved, config, ckpt_path, source)
        if config.hydra.output_subdir is not None and (record / "config.yaml").is_file():  # DDP's other ranks: None
            self.keep_record(record)
        if resumed is not None:
            self.use_config(config, resumed, merged)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        for note in self.notes:  # Hydra's logging is configured only now
            log.info(note)

    def keep_record(self, record: Path) -> None:
        history = record / "history"
        target = history / str(len(list(history.glob("*"))) if history.is_dir() else 0)
        target.mkdir(parents=True)
        for name in RECORD_FILES:
            if (record / name).is_file():
                shutil.copy2(record / name, target / name)
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
