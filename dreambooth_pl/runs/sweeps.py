"""A sweep (`train.py -m`) survives a failed job: the failure is recorded in the job's folder, the other jobs
run, the report is written from what finished, and the sweep exits 1 naming the failed jobs.

`fail_fast=true` stops the sweep at its first failed job instead. A stop (SIGTERM, Ctrl-C) always ends the
sweep. The records (`<job>/job_failed.json`) are what `python -m dreambooth_pl.report <sweep>` lists too.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from dreambooth_pl.runs.layout import HYDRA_DIR, HYDRA_HISTORY, JOB_FAILED, RUN_LOCK, TRAIN_LOG
from dreambooth_pl.util.config import ConfigError, exit_on_config_error

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_entry_point(job: Callable[[], T], fail_fast: bool = False) -> T | None:
    """The task function's body: a single run ends on a bad setting with its message (exit 1); a sweep's job
    records its failure and returns, unless `fail_fast`."""
    if not HydraConfig.initialized():
        return exit_on_config_error(job)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            return exit_on_config_error(job)
        except SystemExit:
            remove_if_untouched(Path(HydraConfig.get().runtime.output_dir))
            raise
    try:
        return job()
    except Exception as err:  # SystemExit (SIGTERM, a stop) and KeyboardInterrupt end the sweep
        from dreambooth_pl.runs.loggers import sweep_group_and_values

        hydra, (_, swept) = HydraConfig.get(), sweep_group_and_values()
        message = str(err) if isinstance(err, ConfigError) else traceback.format_exc()
        log.error("Job %s (%s) failed: %s", hydra.job.num, " ".join(swept), message)
        record = {"job": hydra.job.num, "overrides": swept, "error": str(err) or type(err).__name__}
        (Path(hydra.runtime.output_dir) / JOB_FAILED).write_text(json.dumps(record, indent=2))
        if fail_fast:
            sys.exit(f"fail_fast=true: stopping the sweep at job {hydra.job.num}.")
        return None


def remove_if_untouched(run_dir: Path) -> None:
    """A new run folder refused on its settings holds only what Hydra wrote before the job (its config record,
    the log of the refusal, the lock): gone with the run, as the console said why. A resumed folder is kept."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {HYDRA_DIR, TRAIN_LOG, RUN_LOCK}:
        if not (run_dir / HYDRA_DIR / HYDRA_HISTORY).exists():
            shutil.rmtree(run_dir)
            log.info("Removed the run folder %s: nothing was written to it.", run_dir)


def one_line(message: str) -> str:
    """A multi-line error (a config error's list of problems) on one line."""
    text = ""
    for line in (line.strip() for line in message.splitlines() if line.strip()):
        text += (" " if not text or text.endswith(":") else "; ") + line
    return text.strip()


def failed_jobs(sweep_dir: str | Path) -> list[dict]:
    """The failure records of a sweep's jobs, by job number."""
    found = []
    for path in Path(sweep_dir).glob(f"*/{JOB_FAILED}"):
        try:
            found.append({**json.loads(path.read_text()), "folder": str(path.parent)})
        except (OSError, ValueError):
            found.append({"job": path.parent.name, "overrides": [], "error": f"{path} cannot be read"})
    return sorted(found, key=lambda r: str(r["job"]).zfill(6))


def expected_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """Every job's swept `key=value`s, in job-number order, as Hydra's basic sweeper planned them from
    `<sweep>/multirun.yaml`; None when the file is missing or another sweeper ran."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dreambooth_pl.runs.loggers import swept_keys
    from dreambooth_pl.runs.records import load_multirun, select

    try:
        multirun = load_multirun(sweep_dir)  # data: never resolved
        if multirun is None or "basic_sweeper" not in str(select(multirun, "hydra.sweeper._target_")):
            return None
        params = [f"{k}={v}" for k, v in (select(multirun, "hydra.sweeper.params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides([*params, *select(multirun, "hydra.overrides.task")])
        swept = swept_keys(Path(sweep_dir))
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        return [[o for o in job if o.split("=", 1)[0].lstrip("+~") in swept] for job in jobs]
    except Exception:  # a damaged multirun.yaml: the report says it cannot list the jobs
        return None


class SweepFailures(Callback):
    """Each job starts without an old failure record; a sweep with failed jobs exits 1 naming them, after
    the other callbacks' ends (the report: Hydra calls `on_multirun_end` in reverse order)."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            (Path(config.hydra.runtime.output_dir) / JOB_FAILED).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        if failed:
            lines = [f"  job {r['job']} ({' '.join(r['overrides'])}): {one_line(r['error'])}" for r in failed]
            sys.exit(f"[sweep] {len(failed)} job(s) of {sweep_dir} failed:\n" + "\n".join(lines))
