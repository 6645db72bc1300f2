"""The report as text: report.md's Markdown, the CSV tables and the console summary a sweep ends with."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from dreambooth_pl.reporting.controls import ControlRow, ReaderNote
from dreambooth_pl.reporting.tables import LABELS, TABLES, TRAINING, grouped, run_label, summarize, trained_first

KEY_COLUMNS = ["source", "row", "method", "model", "prior_weight", "class_noun_condition", "subjects", "runs"]


def div_label(backends: Sequence[str]) -> str:
    """The DIV column's header says when our numbers are not the paper's LPIPS."""
    if any(b != "lpips" for b in backends):
        return f"DIV ({'/'.join(backends)}: NOT LPIPS, compare directions only)"
    return "DIV"


def column_labels(runs: list[dict], notes: list[ReaderNote]) -> dict[str, str]:
    """Metric column headers; a column whose reader is not fully validated says so (the Readers list says why)."""
    labels = {**LABELS, "div": div_label(_backends(runs))}
    for note in notes:
        if note.status != "validated":
            for column in note.columns:
                labels[column] = f"{labels[column]} (reader {note.status})"
    return labels


def _backends(runs: list[dict]) -> list[str]:
    return sorted({r["div_backend"] for r in runs if r["div_backend"]})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def intro(runs: list[dict], sources: Sequence[str], controls: dict[str, ControlRow]) -> list[str]:
    """What the report is made of: trained runs and control evaluations counted apart, and how to read it."""
    trained = [r for r in runs if not r["control"]]
    evaluated = [r for r in runs if r["control"]]
    subjects = len({r["subject"] for r in runs})
    counted = _count(len(trained), "trained run")
    if evaluated:
        names = sorted({controls[r["method"]].name if r["method"] in controls else r["method"] for r in evaluated})
        counted += f" and {_count(len(evaluated), 'control evaluation')} ({', '.join(names)})"
    backends = _backends(runs)
    div = f"DIV backend: {', '.join(backends) or 'n/a'}"
    if "dino" in backends:
        div += " (1 - cosine of DINO features: the paper's DIV is LPIPS, compare directions only)"
    lines = [
        f"{counted} of {_count(subjects, 'subject')}, from {', '.join(map(str, sources))}.",
        "Scores are raw cosine similarities (the paper's scale); ± is the standard error over subjects (runs of",
        "one subject are averaged first). Rows marked *paper* are the published numbers (Ruiz et al. 2023),",
        "measured with Imagen or Stable Diffusion on 30 subjects x 25 prompts x 4 images; they are not ours.",
        f"{div}.",
    ]
    if "vae" in backends:
        lines.append(
            "DIV vae: an LPIPS-style distance on the toy VAE encoder's feature maps (no learned weights); not the"
            " paper's LPIPS scale."
        )
    return lines


def readers_markdown(notes: list[ReaderNote]) -> list[str]:
    if not notes:
        return []
    return ["", "## Readers", "", *(f"- {note.sentence}" for note in notes)]


def _cell(row: dict, name: str) -> str:
    mean, se = row.get(f"{name}_mean"), row.get(f"{name}_se")
    if mean is None:
        return "N/A"
    return f"{mean:.3f} ± {se:.3f}" if se is not None else f"{mean:.3f}"


def tables_markdown(tables: dict[str, list[dict]], labels: dict[str, str], unfilled: dict[str, str]) -> list[str]:
    """The tables the sweep's axes fill; one line for each left out, saying why."""
    lines = []
    for name, rows in tables.items():
        if name in unfilled:
            continue
        metrics = TABLES[name]["metrics"]
        lines += ["", f"## {TABLES[name]['title']}", ""]
        lines.append("| source | row | subjects | runs | " + " | ".join(labels[m] for m in metrics) + " |")
        lines.append("|" + " --- |" * (4 + len(metrics)))
        for row in rows:
            source = "*paper*" if row["source"] == "paper" else "ours"
            cells = [source, row["row"], str(row["subjects"]), str(row.get("runs", ""))]
            cells += [_cell(row, m) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    if unfilled:
        lines.append("")
        for name, why in unfilled.items():
            title = TABLES[name]["title"].split(":")[0]
            lines.append(f"{title} ({TABLES[name]['axis']} ablation) is left out: {why} (its rows are in {name}.csv).")
    return lines


def paired_markdown(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """The comparisons with an interval; one line for those without (a single subject scored by both rows)."""
    lines = ["", "## Paired differences", ""]
    with_interval = [r for r in rows if r["ci_low"] is not None]
    single = len(rows) - len(with_interval)
    if not with_interval:
        return lines + [
            "No intervals: each pair of rows shares one subject, and a paired interval needs two or more "
            "(sweep more subjects); the differences alone are in paired.csv."
        ]
    lines += [
        "Row A − row B per subject (each subject's runs averaged first), then the mean over the subjects both",
        "rows have, with a 95% Student-t interval; **bold**: the interval excludes 0 (a difference the data",
        "support), otherwise the rows are not told apart.",
        "",
        "| table | comparison (A − B) | metric | subjects | difference | 95% interval |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for row in with_interval:
        mean = f"{row['mean']:+.3f}"
        cells = [row["table"], row["comparison"], labels[row["metric"]], str(row["subjects"])]
        cells += [f"**{mean}**" if row["excludes_0"] else mean, f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    if single:
        verb = "has" if single == 1 else "have"
        lines += ["", f"{_count(single, 'comparison')} with only one shared subject {verb} no interval (paired.csv)."]
    return lines


def with_gaps(report: str, gaps: list[str]) -> str:
    """The report with what it lacks listed under its title, before any table."""
    if not gaps:
        return report
    title, _, rest = report.partition("\n")
    section = ["", "## Missing from this report", "", *(f"- {gap}" for gap in gaps)]
    return "\n".join([title, *section, ""]) + rest


def write_csv(rows: list[dict], columns: list[str], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def console_summary(runs: list[dict], controls: dict[str, ControlRow]) -> str:
    """Every row (trained rows, then controls) by every metric: means over subjects, for the console."""
    groups = trained_first(grouped(runs, (*TRAINING, "class_noun_condition")))
    rows = [(run_label(group[0], controls, short=True), summarize(group, LABELS)) for _, group in groups]
    width = max(len(label) for label, _ in rows)
    header = f"{'row':<{width}}  subjects  runs" + "".join(f"  {LABELS[m]:>6}" for m in LABELS)
    lines = [header]
    for label, row in rows:
        values = "".join(
            f"  {row[f'{m}_mean']:>6.3f}" if row[f"{m}_mean"] is not None else f"  {'n/a':>6}" for m in LABELS
        )
        lines.append(f"{label:<{width}}  {row['subjects']:>8}  {row['runs']:>4}{values}")
    trained = sum(not r["control"] for r in runs)
    title = f"{_count(len(rows), 'row')} x {_count(len(LABELS), 'metric')} ({_count(trained, 'trained run')}, "
    title += f"{_count(len(runs) - trained, 'control evaluation')}; means over subjects):"
    return "\n".join([title, *lines])
