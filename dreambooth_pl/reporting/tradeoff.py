"""The fidelity/editability trade-off of a sweep's runs: the validation curves the training writes
(`<run>/validation/metrics.csv`, one row per validated step, step 0 the base model) and the step it selected
 (`<run>/validation/selected.json`). Runs without them are left out of the figure, not an error."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dreambooth_pl.reporting.records import ReportInputError
from dreambooth_pl.runs.layout import TRADEOFF_FIGURE, VALIDATION_CURVE, VALIDATION_DIR, VALIDATION_SELECTED
from dreambooth_pl.util.tradeoff_plot import PlotCurve, tradeoff_plot


@dataclass
class Curve:
    """One run's validated steps (`points`: step -> metrics) and its selection, if it made one."""

    row: str
    run: dict
    points: dict[int, dict[str, float | None]]
    selected: dict | None


def _number(text: str | None) -> float | None:
    value = float(text) if text not in (None, "") else None
    return value if value is not None and math.isfinite(value) else None


def read_curve(folder: Path) -> dict[int, dict[str, float | None]]:
    path = folder / VALIDATION_CURVE
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        points = {int(r["step"]): {k: _number(v) for k, v in r.items() if k != "step"} for r in rows}
        if not points or any(k not in next(iter(points.values())) for k in ("dino", "clip_t")):
            raise ValueError("no rows, or no dino and clip_t columns")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportInputError(f"{path} is not a validation table ({type(err).__name__}: {err})") from None
    return dict(sorted(points.items()))


def read_selected(folder: Path) -> dict | None:
    path = folder / VALIDATION_SELECTED
    if not path.is_file():
        return None
    try:
        selected = json.loads(path.read_text())
        selected = {**selected, "step": int(selected["step"]), "metrics": dict(selected["metrics"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportInputError(f"{path} is not a step selection ({type(err).__name__}: {err})") from None
    return selected


def load_curves(runs: list[dict], label) -> tuple[list[Curve], list[str]]:
    """The runs' validation curves (`label(run)` names each one's row), and a line per damaged file."""
    curves, damaged = [], []
    for run in runs:
        folder = Path(run["run"]) / VALIDATION_DIR
        if not (folder / VALIDATION_CURVE).is_file() and not (folder / VALIDATION_SELECTED).is_file():
            continue
        try:
            points = read_curve(folder) if (folder / VALIDATION_CURVE).is_file() else {}
            curves.append(Curve(label(run), run, points, read_selected(folder)))
        except ReportInputError as err:
            damaged.append(f"{err}: left out of the trade-off figure")
    curves.sort(key=lambda c: (c.row, c.run["subject"], c.run["seed"] is None, c.run["seed"] or 0, c.run["run"]))
    return curves, damaged


def _plotted(point: dict) -> bool:
    return point.get("dino") is not None and point.get("clip_t") is not None


def tradeoff_figure(curves: list[Curve]) -> Image.Image | None:
    """A row's curve is the mean of its runs' DINO and CLIP-T at each validated step (over the runs that
    validated it), and each run's kept step a ringed mark: one run per subject would be a tangle. None
    without points."""
    steps: dict[str, dict[int, list[tuple[float, float]]]] = {}
    marks = []
    for curve in curves:
        row = steps.setdefault(curve.row, {})
        for step, point in curve.points.items():
            if _plotted(point):
                row.setdefault(step, []).append((point["clip_t"], point["dino"]))
        kept = curve.selected and curve.points.get(curve.selected["step"])
        if kept and _plotted(kept):
            marks.append((curve.row, kept["clip_t"], kept["dino"]))
    def mean(values: list[tuple[float, float]]) -> tuple[float, float]:
        return sum(x for x, _ in values) / len(values), sum(y for _, y in values) / len(values)

    means = [PlotCurve(row, "", [(s, *mean(v)) for s, v in sorted(at.items())]) for row, at in steps.items()]
    return tradeoff_plot(means, "DINO", marks=marks)


def _rule(selected: dict) -> str:
    rule = selected.get("rule")
    text = rule if isinstance(rule, str) else json.dumps(rule, sort_keys=True)
    return f"{selected.get('select', '?')}: {text}"


def _value(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def tradeoff_markdown(curves: list[Curve], figure: bool) -> list[str]:
    """The figure's link and the selected steps: one row per run, its rule once when all runs share it."""
    lines = ["", "## Fidelity and editability during training", ""]
    if figure:
        lines += [
            "Each run's validation scores at every validated step (step 0: the base model); the step the run kept",
            f"is ringed: ![trade-off]({TRADEOFF_FIGURE})",
        ]
    chosen = [c for c in curves if c.selected]
    if not chosen:
        return lines + ["", f"No run recorded a selected step ({VALIDATION_DIR}/{VALIDATION_SELECTED})."]
    rules = {_rule(c.selected) for c in chosen}
    shared = len(rules) == 1
    lines += ["", f"Selected steps (rule {next(iter(rules))})." if shared else "Selected steps.", ""]
    header = ["row", "subject", "seed", "selected step", "steps validated", "DINO", "CLIP-T", "CLIP-I"]
    header += [] if shared else ["rule"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for curve in chosen:
        metrics = curve.selected["metrics"]
        cells = [curve.row, curve.run["subject"], str(curve.run["seed"] if curve.run["seed"] is not None else "")]
        cells += [str(curve.selected["step"]), str(len(curve.points) or "n/a")]
        cells += [_value(metrics, m) for m in ("dino", "clip_t", "clip_i")]
        cells += [] if shared else [_rule(curve.selected)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
