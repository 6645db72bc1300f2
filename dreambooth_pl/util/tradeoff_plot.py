"""Fidelity against editability as a picture, the same for one run (the validation callback's
`tradeoff.png`) and for a sweep's runs overlaid (the report's): prompt fidelity (CLIP-T) across, subject
fidelity up, as the personalisation papers draw it; step 0 (the base model) a square, the kept step ringed."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
FLOOR_COLOUR = "#969696"


@dataclass
class PlotCurve:
    """One run's validated steps: (step, CLIP-T, subject fidelity) in step order; `group` picks the colour
    (a sweep's row), `name` is written at the last point (the subject), `selected` the step the run kept."""

    group: str
    name: str
    points: list[tuple[int, float, float]]
    selected: int | None = None


@dataclass
class _Axes:
    left: int
    top: int
    right: int
    bottom: int
    x: tuple[float, float]
    y: tuple[float, float]

    def at(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x[0]) / (self.x[1] - self.x[0])
        fy = (y - self.y[0]) / (self.y[1] - self.y[0])
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, 0.01)
    return low - pad, high + pad


def _frame(draw: ImageDraw.ImageDraw, axes: _Axes, y_label: str, title: str, font) -> None:
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
    draw.text((axes.left, axes.bottom + 26), "CLIP-T (prompt fidelity), higher to the right", fill="black", font=font)
    draw.text((axes.left - 44, axes.top - 20), f"{y_label} (subject fidelity), higher up", fill="black", font=font)
    draw.text((axes.left - 44, 6), title, fill="black", font=font)


def _legend(draw: ImageDraw.ImageDraw, colours: dict[str, str], left: int, top: int, font) -> None:
    for k, (group, colour) in enumerate(colours.items()):
        y = top + k * 18
        draw.rectangle([left, y + 2, left + 12, y + 12], fill=colour)
        text = group.replace("λ", "lambda")  # the default font has no Greek
        draw.text((left + 18, y), text if len(text) <= 48 else text[:45] + "...", fill="black", font=font)


def _ring(draw: ImageDraw.ImageDraw, at: tuple[float, float], colour: str) -> None:
    x, y = at
    draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour, outline="black", width=2)


def tradeoff_plot(
    curves: list[PlotCurve], y_label: str, floor: float | None = None, marks: list[tuple[str, float, float]] = ()
) -> Image.Image | None:
    """The curves on shared axes, None without points. One curve: every step labelled, and `floor` (the
    selection rule's lowest CLIP-T) a grey vertical line. Several: coloured by group, with a legend.
    `marks`: (group, CLIP-T, subject fidelity) points drawn ringed in their group's colour (kept steps)."""
    curves = [c for c in curves if c.points]
    if not curves:
        return None
    single = len(curves) == 1 and not marks
    size = (640, 520) if single else (1000, 640)
    xs = [x for c in curves for _, x, _ in c.points] + [x for _, x, _ in marks] + ([floor] if floor is not None else [])
    ys = [y for c in curves for *_, y in c.points] + [y for *_, y in marks]
    axes = _Axes(70, 50, size[0] - (40 if single else 330), size[1] - 60, _span(xs), _span(ys))
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    what = "one point per validated step" if single else "a row's mean over its runs at each validated step"
    title = f"Validation during training: {what}; square: step 0 (the base model); ringed: a kept step"
    _frame(draw, axes, y_label, title, font)
    if floor is not None:
        fx, _ = axes.at(floor, axes.y[0])
        draw.line([fx, axes.top, fx, axes.bottom], fill=FLOOR_COLOUR, width=1)
        draw.text((fx + 3, axes.top + 3), "CLIP-T floor", fill=FLOOR_COLOUR, font=font)
    colours = {group: PALETTE[k % len(PALETTE)] for k, group in enumerate(dict.fromkeys(c.group for c in curves))}
    for curve in curves:
        colour = colours[curve.group]
        xy = {step: axes.at(x, y) for step, x, y in curve.points}
        if len(xy) > 1:
            draw.line(list(xy.values()), fill=colour, width=2)
        for step, (x, y) in xy.items():
            if step == 0:
                draw.rectangle([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
            else:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            if single:
                draw.text((x + 7, y - 12), str(step), fill="black", font=font)
        if curve.selected in xy:
            _ring(draw, xy[curve.selected], colour)
        if curve.name:
            x, y = xy[max(xy)]  # the curve's name at its last step
            draw.text((x + 7, y - 14), curve.name, fill=colour, font=font)
    for group, x, y in marks:
        _ring(draw, axes.at(x, y), colours.setdefault(group, PALETTE[len(colours) % len(PALETTE)]))
    if not single:
        _legend(draw, colours, axes.right + 16, axes.top, font)
    return image
