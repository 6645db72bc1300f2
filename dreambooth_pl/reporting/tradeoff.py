"""The fidelity trade-off of one run as a picture: subject fidelity against prompt fidelity, a point per
validated step. Drawn with PIL alone (matplotlib is optional in this project)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

SIZE, MARGIN = 480, 56
BASE, POINT, SELECTED, FLOOR = (40, 90, 200), (60, 60, 60), (220, 40, 40), (150, 150, 150)


def _span(values: list[float]) -> tuple[float, float]:
    """Axis limits with a little room; a flat metric still gets a visible range."""
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, 0.01)
    return low - pad, high + pad


def draw_tradeoff(
    rows: list[dict], subject_metric: str, selected_step: int | None, floor: float | None = None
) -> Image.Image:
    """`rows`: {"step", subject_metric, "clip_t"} per validated step, in step order. x: CLIP-T (prompt
    fidelity), y: the subject metric. The first row (the base model, step 0) is a blue square, the selected
    step a red ring, the rule's CLIP-T floor a grey vertical line; a line joins the steps in order."""
    xs = [r["clip_t"] for r in rows] + ([floor] if floor is not None else [])
    (x0, x1), (y0, y1) = _span(xs), _span([r[subject_metric] for r in rows])
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    inner = SIZE - 2 * MARGIN

    def at(x: float, y: float) -> tuple[float, float]:
        return MARGIN + (x - x0) / (x1 - x0) * inner, SIZE - MARGIN - (y - y0) / (y1 - y0) * inner

    draw.rectangle([MARGIN, MARGIN, SIZE - MARGIN, SIZE - MARGIN], outline="black")
    for value, (px, _) in ((x0, at(x0, y0)), (x1, at(x1, y0))):
        draw.text((px - 12, SIZE - MARGIN + 4), f"{value:.3f}", fill="black", font=font)
    for value, (_, py) in ((y0, at(x0, y0)), (y1, at(x0, y1))):
        draw.text((4, py - 6), f"{value:.3f}", fill="black", font=font)
    draw.text((SIZE // 2 - 60, SIZE - 20), "CLIP-T (prompt fidelity)", fill="black", font=font)
    draw.text((4, 8), f"{subject_metric} (subject fidelity)", fill="black", font=font)
    if floor is not None:
        fx, _ = at(floor, y0)
        draw.line([fx, MARGIN, fx, SIZE - MARGIN], fill=FLOOR, width=1)
        draw.text((fx + 3, MARGIN + 3), "floor", fill=FLOOR, font=font)
    points = [at(r["clip_t"], r[subject_metric]) for r in rows]
    if len(points) > 1:
        draw.line(points, fill=(200, 200, 200), width=1)
    for index, (row, (px, py)) in enumerate(zip(rows, points)):
        if index == 0:
            draw.rectangle([px - 5, py - 5, px + 5, py + 5], fill=BASE)
        else:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=POINT)
        if row["step"] == selected_step:
            draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline=SELECTED, width=2)
        chosen = row["step"] == selected_step
        label = f"{row['step']}" + (" base" if index == 0 else "") + (" selected" if chosen else "")
        draw.text((px + 7, py - 12), label, fill=SELECTED if chosen else "black", font=font)
    return image
