"""The evaluated runs a report reads: every `eval/metrics.json`, flattened to one row per run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dreambooth_pl.runs.layout import EVAL_DIR, METRICS_FILE

BASE = "base"  # the method of a base-model evaluation: nothing was fine-tuned


class ReportInputError(ValueError):
    """A file the report reads is damaged; it is named and left out."""


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """metrics.json files given directly, or every eval/metrics.json below the given folders."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob(METRICS_FILE) if p.parent.name == EVAL_DIR)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def read_report_rows(files: list[Path]) -> tuple[list[dict], list[str]]:
    """The runs that can be read, and a line for each file that cannot."""
    runs, damaged = [], []
    for path in files:
        try:
            runs.append(read_report_row(path))
        except ReportInputError as err:
            damaged.append(f"{err}: left out; evaluate the run again")
    return runs, damaged


def read_report_row(path: Path) -> dict:
    """One flat row: the metadata the report groups by, the metrics and where the run's grid is.
    `control` is true for a row nothing was trained for (the base model, or one its evaluation says is)."""
    try:
        record = json.loads(path.read_text())
        meta = record["metadata"]
        record["metrics"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReportInputError(f"{path} is not a whole evaluation record ({type(err).__name__}: {err})") from None
    weight = meta.get("prior_weight")
    prior_weight = 0.0 if meta.get("prior_enabled") is False else (None if weight is None else float(weight))
    method = meta.get("method") or "dreambooth"
    return {
        "run": str(path.parent.parent),
        "subject": meta["subject"],
        "method": method,
        "model": meta.get("model") or "unknown",
        "prior_weight": prior_weight,
        "class_noun_condition": meta["class_noun_condition"],
        "class_noun": meta["class_noun"],
        "instance_class_noun": meta["instance_class_noun"],
        "identifier": meta["identifier"],
        "control": method == BASE or bool(meta.get("control")),
        "steps": meta.get("steps"),
        "seed": meta.get("seed"),
        "eval_seed": meta.get("eval_seed"),
        "num_prompts": meta.get("num_prompts"),
        "images_per_prompt": meta.get("images_per_prompt"),
        "div_backend": record.get("div_backend"),
        "dino_model": meta.get("dino_model"),
        "tags": ";".join(meta.get("tags") or []),
        "grid": str(path.parent / record.get("grids", {}).get("grid", "grid.png")),
        "real_images_dir": meta.get("real_images_dir"),
        "pres_prompt": meta.get("pres_prompt"),
        "pres_images": [str(path.parent / image["file"]) for image in record.get("pres_images", [])],
        **record["metrics"],
    }
