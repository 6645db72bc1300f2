"""Weights & Biases that never blocks a run, with one W&B run per job.

Offline (sync later) when no credentials are found or the server cannot be reached within seconds. Each
job of a sweep is its own run, grouped by the sweep and named by what was swept; a run folder remembers its
W&B run (`wandb/dreambooth_run.json`) so a resume and a later evaluation continue that same run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import shlex
import uuid
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from dreambooth_pl.runs.layout import WANDB_DIR, wandb_run_file
from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.network import server_reachable

log = logging.getLogger(__name__)

RUN_LABELS = ("name", "group", "job_type", "project")  # plain labels; the project is always the config's
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
RUN_LABEL = re.compile(r"[^\x00-\x1f\x7f]{0,128}")
MAX_RUN_RECORD_BYTES = 64 << 10
MODES = ("auto", "online", "offline")


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(wandb_base_url()).hostname or "api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a sweep varies: the sweeper's params (an ablation config's) and the command line's sweep
    overrides, as Hydra's sweeper saved them in `<sweep>/multirun.yaml` before launching the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dreambooth_pl.runs.records import load_multirun, select

    multirun = load_multirun(sweep_dir)  # data: never resolved
    if multirun is None:
        return []
    keys = [str(k) for k in select(multirun, "hydra.sweeper.params") or {}]
    parsed = OverridesParser.create().parse_overrides([str(o) for o in select(multirun, "hydra.overrides.task") or []])
    return keys + [o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group not in keys]


def sweep_group_and_values() -> tuple[str | None, list[str]]:
    """In a Hydra multirun: the sweep folder's name (the W&B group) and this job's swept `key=value`s."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, []
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    swept = swept_keys(sweep_dir)
    return sweep_dir.name, [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]


def read_wandb_run(save_dir: str | os.PathLike) -> dict | None:
    """The W&B run a folder continues, read as data: a run id and plain labels (name, group, job type,
    project), each checked; any other key (`entity`, settings) is refused rather than passed to `wandb.init`."""
    path = wandb_run_file(save_dir)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_RUN_RECORD_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes; the project writes a few hundred")
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not RUN_ID.fullmatch(record["id"]):
            raise ValueError("no run id (letters, digits, - and _)")
        unknown = sorted(set(record) - {"id", *RUN_LABELS})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a key this project writes")
        for key in RUN_LABELS:
            value = record.get(key)
            if value is not None and not (isinstance(value, str) and RUN_LABEL.fullmatch(value)):
                raise ValueError(f"{key} is not a plain label of at most 128 printable characters")
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} is damaged ({type(err).__name__}: {err}): it names the W&B run this folder continues. "
            "Delete it to continue in a new W&B run."
        ) from None
    return {"id": record["id"], **{key: record.get(key) for key in RUN_LABELS}}


def _choose_mode(mode: str, reachability_timeout: float) -> tuple[str, str | None]:
    """wandb's mode and, when it is offline by our choice, why (said once per run)."""
    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r}: use one of {', '.join(MODES)}.")
    if os.environ.get("WANDB_MODE") == "":  # set but empty: wandb's settings reject it; it means unset
        del os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_MODE"):  # the environment wins, as wandb itself decides
        return os.environ["WANDB_MODE"], None
    if mode != "auto":
        return mode, None
    if not wandb_credentials_present():
        return "offline", "No W&B credentials found"
    url = wandb_base_url()
    if not server_reachable(url, reachability_timeout):
        return "offline", f"W&B credentials found but {url} is not reachable within {reachability_timeout:g} s"
    return "online", None


def wandb_logger(
    mode: str = "auto",
    project: str = "dreambooth-pl",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    job_type: str = "train",
    tags: list[str] | None = None,
    continue_run: bool | str | None = None,
    reachability_timeout: float = 5.0,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger holding a run of its own (never another job's run still open in this process).

    name: the run's name; in a multirun the swept values are appended (`teapot-dreambooth-prior.weight=0.0`).
    group: null is the sweep folder's name in a multirun (so a sweep's runs sit together), none otherwise.
    continue_run: set (train.py passes the resume's ckpt_path) continues the W&B run recorded in `save_dir`
    (same id, `resume="allow"`), keeping its name, group and job type; unset (or no record yet) starts a new
    run and records it there.
    mode: auto | online | offline; auto is online with credentials and a reachable server, else offline.
    """
    wandb_mode, offline_reason = _choose_mode(mode, reachability_timeout)
    if rank_zero_only.rank != 0:  # other DDP ranks never open a run (Lightning gives them a dummy)
        return WandbLogger(offline=wandb_mode != "online", project=project, save_dir=save_dir, **kwargs)

    import wandb

    record = read_wandb_run(save_dir) if continue_run else None
    if record is None:
        sweep, swept = sweep_group_and_values()
        record = {
            "id": uuid.uuid4().hex[:8],
            "name": "-".join([name, *swept]) if name else None,
            "group": group or sweep,
            "job_type": job_type,
        }
    Path(save_dir, WANDB_DIR).mkdir(parents=True, exist_ok=True)
    record["project"] = project  # this command's: a record never sends the run elsewhere
    run = wandb.init(
        **record,
        resume="allow",
        dir=save_dir,
        mode=wandb_mode,
        tags=list(tags) if tags else None,
        settings=wandb.Settings(silent=True),  # our own line says where the run is,
    )
    wandb_run_file(save_dir).write_text(json.dumps(record, indent=2))
    if offline_reason:
        log.warning(
            "%s: W&B logs offline; upload later with `wandb sync %s`.",
            offline_reason,
            Path(run.settings.sync_dir).resolve(),
        )
    elif wandb_mode == "online":
        log.info("W&B run %s: %s", run.name, run.url)
    return WandbLogger(experiment=run, project=project, save_dir=save_dir, **kwargs)


def wandb_location(loggers: list[Logger]) -> str | None:
    """Where a W&B run's data is: its URL when online, else the `wandb sync` command that uploads it, with
    every offline folder of the run (each resume and standalone evaluation of it writes one more)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            if not run.offline:
                return run.url
            folders = sorted(Path(run.settings.sync_dir).resolve().parent.glob(f"offline-run-*-{run.id}"))
            return "wandb sync " + " ".join(shlex.quote(str(folder)) for folder in folders)
    return None


def close_loggers(loggers: list[Logger], succeeded: bool) -> None:
    """Flush every logger and finish W&B runs, also when the job failed: the next job of a sweep (same
    process) must start its own run."""
    for logger in loggers:
        logger.finalize("success" if succeeded else "failed")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=0 if succeeded else 1)
