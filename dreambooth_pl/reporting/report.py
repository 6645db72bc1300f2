"""Tables in the layout of the paper (Ruiz et al. 2023, Tables 1, 3 and 4) from evaluated runs.

`python -m dreambooth_pl.report <multirun dir or run dirs or metrics.json files...> [-o OUT]` finds every
`eval/metrics.json`, groups the runs by how they were trained, averages per subject first and then reports the
mean and standard error over subjects, with the paper's published numbers beside ours, labelled "paper".
Rows are compared by per-subject paired differences with 95% t-intervals ("Paired differences").
Writes report.md, table1.csv, table3.csv, table4.csv, paired.csv, runs.csv (one row per run) and, where the
runs allow, language_drift.png and tradeoff.png (the runs' validation curves and selected steps).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dreambooth_pl.reporting.controls import World, configured_worlds, control_rows, mark_controls
from dreambooth_pl.reporting.figures import DRIFT_FILE, drift_markdown, language_drift_grid
from dreambooth_pl.reporting.gaps import sweep_gaps
from dreambooth_pl.reporting.records import find_metrics, read_report_rows
from dreambooth_pl.reporting.render import (
    KEY_COLUMNS,
    column_labels,
    intro,
    paired_markdown,
    readers_markdown,
    tables_markdown,
    with_gaps,
    write_csv,
)
from dreambooth_pl.reporting.statistics import PAIRED_COLUMNS, paired_comparisons
from dreambooth_pl.reporting.tables import TABLES, build_tables, run_label, unfilled_tables
from dreambooth_pl.reporting.tradeoff import load_curves, tradeoff_figure, tradeoff_markdown
from dreambooth_pl.runs.layout import REPORT_DIR, TRADEOFF_FIGURE
from dreambooth_pl.util.images import save_atomically


def read_runs(paths: Sequence[str | Path], worlds: Sequence[World] = ()) -> tuple[list[dict], list[str]]:
    """The evaluated runs under `paths`, the worlds' control rows marked, and a line per damaged file."""
    runs, damaged = read_report_rows(find_metrics(paths))
    return mark_controls(runs, control_rows(worlds)), damaged


def write_report(paths: Sequence[str | Path], output_dir: str | Path, worlds: Sequence[World] = ()) -> dict[str, Path]:
    """Write report.md and the CSV tables (and the figures the runs allow); return their paths by name."""
    runs, damaged = read_runs(paths, worlds)
    folders = [path for path in map(Path, paths) if path.is_dir()]
    if not runs and not damaged:
        gaps = [line for path in folders for line in sweep_gaps(path, [])]
        raise FileNotFoundError(
            f"No eval/metrics.json under {', '.join(map(str, paths))}: evaluate the runs first."
            + "".join(f"\n  {gap}" for gap in gaps)
        )
    if not runs:
        raise FileNotFoundError("No readable eval/metrics.json: " + "; ".join(damaged))
    controls = control_rows(worlds, runs)
    curves, damaged_curves = load_curves([r for r in runs if not r["control"]], lambda r: run_label(r, controls))
    gaps = damaged + damaged_curves + [line for path in folders for line in sweep_gaps(path, runs)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"report": out / "report.md", "runs": out / "runs.csv"}
    notes = [note for world in worlds for note in world.reader_notes(runs)]
    labels = column_labels(runs, notes)
    tables = build_tables(runs, controls)
    paired = paired_comparisons(runs, controls)
    lines = ["# DreamBooth evaluation report", "", *intro(runs, paths, controls), *readers_markdown(notes)]
    lines += tables_markdown(tables, labels, unfilled_tables(runs))
    lines += paired_markdown(paired, labels) if paired else []
    drift = language_drift_grid(runs)
    if drift is not None:
        written["language_drift"] = save_atomically(drift, out / DRIFT_FILE)
        lines += drift_markdown()
    if curves:
        figure = tradeoff_figure(curves)
        if figure is not None:
            written["tradeoff"] = save_atomically(figure, out / TRADEOFF_FIGURE)
        lines += tradeoff_markdown(curves, figure is not None)
    written["report"].write_text(with_gaps("\n".join(lines) + "\n", gaps))
    write_csv(runs, [k for k in runs[0] if k != "pres_images"], written["runs"])
    for name, rows in tables.items():
        stats = [f"{m}_{s}" for m in TABLES[name]["metrics"] for s in ("mean", "se")]
        written[name] = write_csv(rows, KEY_COLUMNS + stats, out / f"{name}.csv")
    written["paired"] = write_csv(paired, PAIRED_COLUMNS, out / "paired.csv")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_pl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="a multirun folder, run folders, or metrics.json files")
    parser.add_argument(
        "-o", "--output", help="where to write (default: <the folder>/report for one folder, else ./report)"
    )
    args = parser.parse_args(argv)
    default = (
        Path(args.paths[0]) / REPORT_DIR if len(args.paths) == 1 and Path(args.paths[0]).is_dir() else Path("report")
    )
    try:
        written = write_report(args.paths, args.output or default, configured_worlds())
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(written["report"].read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
