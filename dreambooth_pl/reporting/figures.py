"""The paper's language-drift picture: "a [class noun]" before and after DreamBooth, with and without PPL."""

from __future__ import annotations

from PIL import Image

from dreambooth_pl.reporting.records import BASE
from dreambooth_pl.util.images import image_grid, load_rgb

DRIFT_FILE = "language_drift.png"


def drift_candidates(runs: list[dict], subject: str) -> dict[str, list[dict]]:
    """A subject's runs that can fill each row of its language-drift grid."""
    mine = [r for r in runs if r["subject"] == subject and r["class_noun_condition"] == "correct"]
    dreambooth = [r for r in mine if r["method"] == "dreambooth"]
    return {
        "base model": [r for r in mine if r["method"] == BASE],
        "DreamBooth, no prior preservation (lambda=0)": [r for r in dreambooth if r["prior_weight"] == 0],
        "DreamBooth, prior preservation (lambda=1)": [r for r in dreambooth if (r["prior_weight"] or 0) > 0],
    }


def language_drift_grid(runs: list[dict], columns: int = 8) -> Image.Image | None:
    """The PRES images ("a [class noun]", same seeds) from the base model, after DreamBooth without prior
    preservation and with it; three rows per subject, the lowest seed's runs. None if no subject has all three."""

    def first(candidates: list[dict]) -> dict | None:
        usable = [r for r in candidates if r["pres_images"]]
        return min(usable, key=lambda r: (r["seed"] is None, r["seed"] or 0, r["run"])) if usable else None

    rows = []  # (label, run)
    for subject in sorted({r["subject"] for r in runs}):
        trio = {name: first(candidates) for name, candidates in drift_candidates(runs, subject).items()}
        if all(trio.values()):
            rows += [(f"{subject}: {name}: {run['pres_prompt']!r}", run) for name, run in trio.items()]
    if not rows:
        return None
    count = min(columns, *(len(run["pres_images"]) for _, run in rows))
    images = [load_rgb(path) for _, run in rows for path in run["pres_images"][:count]]
    return image_grid(images, cols=count, row_labels=[label for label, _ in rows])


def drift_markdown() -> list[str]:
    return [
        "",
        "## Language drift",
        "",
        'Each subject\'s "a [class noun]" from the same seeds: base model, DreamBooth without prior preservation,',
        f"DreamBooth with it: ![language drift]({DRIFT_FILE})",
    ]
