"""What a sweep's report lacks, listed at its top: failed and missing jobs, missing control and drift rows."""

from __future__ import annotations

from pathlib import Path

from dreambooth_pl.reporting.figures import drift_candidates
from dreambooth_pl.reporting.records import BASE
from dreambooth_pl.runs.layout import EVAL_DIR, METRICS_FILE, MULTIRUN
from dreambooth_pl.runs.records import load_multirun, select
from dreambooth_pl.runs.sweeps import expected_jobs, failed_jobs, one_line


def sweep_gaps(sweep_dir: Path, runs: list[dict]) -> list[str]:
    """Failed jobs, jobs without an evaluation, subjects without a base-model row, language-drift rows that
    cannot be drawn. Empty for a folder that is not a sweep."""
    multirun = load_multirun(sweep_dir)  # data: never resolved
    if multirun is None:
        return []
    hydra = multirun.get("hydra") or {}
    trained = sorted({r["subject"] for r in runs if not r["control"]})
    gaps = _job_gaps(sweep_dir, runs, hydra)
    callbacks = [c for c in (hydra.get("callbacks") or {}).values() if isinstance(c, dict)]
    reports = [c for c in callbacks if "SweepReport" in str(c.get("_target_"))]
    if any(c.get("base_model") for c in reports):
        base = {r["subject"] for r in runs if r["method"] == BASE}
        missing = [s for s in trained if s not in base]
        if missing:
            gaps.append(
                f"base model row: not evaluated for {', '.join(missing)} (the sweep stopped or failed "
                "in its base-model evaluation): Table 1's base row and the drift grid lack them"
            )
    for subject in trained:
        rows = drift_candidates(runs, subject)
        lacking = [name for name, candidates in rows.items() if not any(r["pres_images"] for r in candidates)]
        if lacking and len(lacking) < len(rows):
            gaps.append(f"language-drift grid: no rows for {subject} (missing: {'; '.join(lacking)})")
    return gaps


def _job_gaps(sweep_dir: Path, runs: list[dict], hydra: dict) -> list[str]:
    """A line per failed job and per job that never started or was not evaluated."""
    failed = failed_jobs(sweep_dir)
    gaps = [f"job {r['job']} ({' '.join(r['overrides'])}) failed: {one_line(r['error'])}" for r in failed]
    evaluated = {Path(r["run"]).resolve() for r in runs}
    failed_folders = {Path(r["folder"]).resolve() for r in failed if "folder" in r}
    jobs = expected_jobs(sweep_dir) if select(hydra, "sweep.subdir") == "${hydra.job.num}" else None
    if jobs is None:
        gaps.append(f"the sweep's jobs cannot be listed from {sweep_dir / MULTIRUN}: missing jobs not checked")
    for num, overrides in enumerate(jobs or []):
        folder = (sweep_dir / str(num)).resolve()
        if folder in evaluated or folder in failed_folders:
            continue
        state = "never started" if not folder.is_dir() else f"no {EVAL_DIR}/{METRICS_FILE} (stopped, or not evaluated)"
        gaps.append(f"job {num} ({' '.join(overrides)}): {state}")
    return gaps
