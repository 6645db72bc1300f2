"""The fidelity/editability trade-off during training: one run's picture (`draw_tradeoff`, written by the
validation callback) and every run of a sweep overlaid: the validation curves the training
writes (`<run>/validation/metrics.csv`, one row per validated step, step 0 the base model) and the step it
selected (`<run>/validation/selected.json`). Runs without them are left out of the figure, not an error."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dreambooth_pl.reporting.records import ReportInputError
from dreambooth_pl.runs.layout import TRADEOFF_FIGURE, VALIDATION_CURVE, VALIDATION_DIR, VALIDATION_SELECTED

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


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


@dataclass
class _Axes:
    """The plot area (pixels) and the data ranges it shows: DINO across, CLIP-T up."""

    left: int
    top: int
    right: int
    bottom: int
    x: tuple[float, float]
    y: tuple[float, float]

    def at(self, dino: float, clip_t: float) -> tuple[float, float]:
        fx = (dino - self.x[0]) / (self.x[1] - self.x[0])
        fy = (clip_t - self.y[0]) / (self.y[1] - self.y[0])
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, 0.01)
    return low - pad, high + pad


def _frame(draw: ImageDraw.ImageDraw, axes: _Axes, font: ImageFont.ImageFont) -> None:
    """Axes, gridlines with tick values, axis titles."""
    for k in range(6):
        f = k / 5
        x = axes.left + f * (axes.right - axes.left)
        y = axes.bottom - f * (axes.bottom - axes.top)
        draw.line([(x, axes.top), (x, axes.bottom)], fill="#e6e6e6")
        draw.line([(axes.left, y), (axes.right, y)], fill="#e6e6e6")
        draw.text((x - 14, axes.bottom + 6), f"{axes.x[0] + f * (axes.x[1] - axes.x[0]):.3f}", fill="black", font=font)
        draw.text((axes.left - 44, y - 6), f"{axes.y[0] + f * (axes.y[1] - axes.y[0]):.3f}", fill="black", font=font)
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline="black")
    draw.text((axes.left, axes.bottom + 26), "DINO (subject fidelity), higher to the right", fill="black", font=font)
    draw.text((axes.left - 44, axes.top - 20), "CLIP-T (prompt fidelity), higher up", fill="black", font=font)
    title = "Validation during training: a line per run; square: step 0 (the base model); ringed: the selected step"
    draw.text((axes.left - 44, 6), title, fill="black", font=font)


def _legend(draw: ImageDraw.ImageDraw, colours: dict[str, str], left: int, top: int, font) -> None:
    for k, (row, colour) in enumerate(colours.items()):
        y = top + k * 18
        draw.rectangle([left, y + 2, left + 12, y + 12], fill=colour)
        text = row.replace("λ", "lambda")  # the default font has no Greek
        draw.text((left + 18, y), text if len(text) <= 48 else text[:45] + "...", fill="black", font=font)


def _plotted(point: dict) -> bool:
    return point.get("dino") is not None and point.get("clip_t") is not None


def tradeoff_figure(curves: list[Curve], size: tuple[int, int] = (1000, 640)) -> Image.Image | None:
    """DINO against CLIP-T at every validated step, a line per run coloured by its row; None without points."""
    drawn = [c for c in curves if any(map(_plotted, c.points.values()))]
    if not drawn:
        return None
    points = [p for c in drawn for p in c.points.values() if _plotted(p)]
    spans = _span([p["dino"] for p in points]), _span([p["clip_t"] for p in points])
    axes = _Axes(70, 50, size[0] - 330, size[1] - 60, *spans)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _frame(draw, axes, font)
    colours = {row: PALETTE[k % len(PALETTE)] for k, row in enumerate(dict.fromkeys(c.row for c in drawn))}
    for curve in drawn:
        colour = colours[curve.row]
        xy = {s: axes.at(p["dino"], p["clip_t"]) for s, p in curve.points.items() if _plotted(p)}
        if len(xy) > 1:
            draw.line(list(xy.values()), fill=colour, width=2)
        for step, (x, y) in xy.items():
            if step == 0:
                draw.rectangle([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
            else:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        x, y = xy[max(xy)]  # the subject's name at its last step
        draw.text((x + 7, y - 14), curve.run["subject"], fill=colour, font=font)
        chosen = curve.selected and xy.get(curve.selected["step"])
        if chosen:
            x, y = chosen
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour, outline="black", width=2)
    _legend(draw, colours, axes.right + 16, axes.top, font)
    return image


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


RUN_SIZE, RUN_MARGIN = 480, 56
RUN_BASE, RUN_POINT, RUN_SELECTED, RUN_FLOOR = (40, 90, 200), (60, 60, 60), (220, 40, 40), (150, 150, 150)


def draw_tradeoff(
    rows: list[dict], subject_metric: str, selected_step: int | None, floor: float | None = None
) -> Image.Image:
    """`rows`: {"step", subject_metric, "clip_t"} per validated step, in step order. x: CLIP-T (prompt
    fidelity), y: the subject metric. The first row (the base model, step 0) is a blue square, the selected
    step a red ring, the rule's CLIP-T floor a grey vertical line; a line joins the steps in order."""
    xs = [r["clip_t"] for r in rows] + ([floor] if floor is not None else [])
    (x0, x1), (y0, y1) = _span(xs), _span([r[subject_metric] for r in rows])
    image = Image.new("RGB", (RUN_SIZE, RUN_SIZE), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    inner = RUN_SIZE - 2 * RUN_MARGIN

    def at(x: float, y: float) -> tuple[float, float]:
        return RUN_MARGIN + (x - x0) / (x1 - x0) * inner, RUN_SIZE - RUN_MARGIN - (y - y0) / (y1 - y0) * inner

    draw.rectangle([RUN_MARGIN, RUN_MARGIN, RUN_SIZE - RUN_MARGIN, RUN_SIZE - RUN_MARGIN], outline="black")
    for value, (px, _) in ((x0, at(x0, y0)), (x1, at(x1, y0))):
        draw.text((px - 12, RUN_SIZE - RUN_MARGIN + 4), f"{value:.3f}", fill="black", font=font)
    for value, (_, py) in ((y0, at(x0, y0)), (y1, at(x0, y1))):
        draw.text((4, py - 6), f"{value:.3f}", fill="black", font=font)
    draw.text((RUN_SIZE // 2 - 60, RUN_SIZE - 20), "CLIP-T (prompt fidelity)", fill="black", font=font)
    draw.text((4, 8), f"{subject_metric} (subject fidelity)", fill="black", font=font)
    if floor is not None:
        fx, _ = at(floor, y0)
        draw.line([fx, RUN_MARGIN, fx, RUN_SIZE - RUN_MARGIN], fill=RUN_FLOOR, width=1)
        draw.text((fx + 3, RUN_MARGIN + 3), "floor", fill=RUN_FLOOR, font=font)
    points = [at(r["clip_t"], r[subject_metric]) for r in rows]
    if len(points) > 1:
        draw.line(points, fill=(200, 200, 200), width=1)
    for index, (row, (px, py)) in enumerate(zip(rows, points)):
        if index == 0:
            draw.rectangle([px - 5, py - 5, px + 5, py + 5], fill=RUN_BASE)
        else:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=RUN_POINT)
        if row["step"] == selected_step:
            draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline=RUN_SELECTED, width=2)
        chosen = row["step"] == selected_step
        label = f"{row['step']}" + (" base" if index == 0 else "") + (" selected" if chosen else "")
        draw.text((px + 7, py - 12), label, fill=RUN_SELECTED if chosen else "black", font=font)
    return image
