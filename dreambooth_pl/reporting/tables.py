"""The paper's Tables 1, 3 and 4 (Ruiz et al. 2023) from evaluated runs: our rows, then the published ones.

Runs are grouped by how they were trained (method, model, prior weight, class noun in the instance prompt),
averaged per subject first, then the mean and standard error over subjects are reported.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from dreambooth_pl.reporting.controls import ControlRow

LABELS = {"pres": "PRES", "div": "DIV", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
METHODS = {"dreambooth": "DreamBooth", "lora": "LoRA DreamBooth", "textual_inversion": "Textual Inversion"}
CONDITIONS = {"correct": "Correct Class", "none": "No Class", "wrong": "Wrong Class"}
TRAINING = ("method", "model", "prior_weight")

# Ruiz et al., DreamBooth, CVPR 2023. Table 1 and 3 use 30 subjects x 25 prompts x 4 images.
TABLES = {
    "table1": {
        "title": "Table 1: subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T)",
        "metrics": ("dino", "clip_i", "clip_t"),
        "paper": [
            ({"row": "Real Images"}, {"dino": 0.774, "clip_i": 0.885, "clip_t": None}),
            ({"row": "DreamBooth (Imagen)"}, {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306}),
            ({"row": "DreamBooth (Stable Diffusion)"}, {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
            ({"row": "Textual Inversion (Stable Diffusion)"}, {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255}),
        ],
    },
    "table3": {
        "title": "Table 3: prior preservation loss ablation (PRES lower is better, DIV higher is better)",
        "metrics": ("pres", "div", "dino", "clip_i", "clip_t"),
        "axis": "prior weight",
        "paper": [
            (
                {"row": "DreamBooth (Imagen) w/ PPL", "prior_weight": 1.0},
                {"pres": 0.493, "div": 0.391, "dino": 0.684, "clip_i": 0.815, "clip_t": 0.308},
            ),
            (
                {"row": "DreamBooth (Imagen) w/o PPL", "prior_weight": 0.0},
                {"pres": 0.664, "div": 0.371, "dino": 0.712, "clip_i": 0.828, "clip_t": 0.306},
            ),
        ],
    },
    "table4": {
        "title": "Table 4: class-noun ablation (the noun in the instance prompt)",
        "metrics": ("dino", "clip_i"),
        "axis": "class noun",
        "paper": [
            ({"row": "Correct Class (Imagen)", "class_noun_condition": "correct"}, {"dino": 0.744, "clip_i": 0.853}),
            ({"row": "No Class (Imagen)", "class_noun_condition": "none"}, {"dino": 0.303, "clip_i": 0.607}),
            ({"row": "Wrong Class (Imagen)", "class_noun_condition": "wrong"}, {"dino": 0.454, "clip_i": 0.728}),
        ],
    },
}


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def summarize(runs: list[dict], metrics: Sequence[str]) -> dict:
    """Mean and standard error over subjects; several runs of one subject count once (their mean)."""
    by_subject = defaultdict(list)
    for run in runs:
        by_subject[run["subject"]].append(run)
    row = {"subjects": len(by_subject), "runs": len(runs)}
    for name in metrics:
        per_subject = []
        for subject_runs in by_subject.values():
            values = [r[name] for r in subject_runs if r.get(name) is not None]
            if values:
                per_subject.append(statistics.fmean(values))
        row[f"{name}_mean"], row[f"{name}_se"] = _mean_se(per_subject)
    return row


def row_label(
    method: str, model: str, prior_weight: float | None, controls: dict[str, ControlRow], short: bool = False
) -> str:
    """A trained row by method, model and prior weight; a control row as its world names it."""
    if method in controls:
        return controls[method].label(model, short)
    if prior_weight is None:
        prior = "prior unknown"
    else:
        prior = f"PPL λ={prior_weight:g}" if prior_weight > 0 else "no PPL"
    return f"{METHODS.get(method, method)} ({model}, {prior})"


def run_label(run: dict, controls: dict[str, ControlRow], short: bool = False) -> str:
    """The row a run belongs to, with its class-noun condition when it was trained with another noun."""
    label = row_label(run["method"], run["model"], run["prior_weight"], controls, short)
    condition = run["class_noun_condition"]
    return label if run["control"] or condition == "correct" else f"{label}: {CONDITIONS.get(condition, condition)}"


def grouped(runs: list[dict], keys: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
    """Runs grouped by the given fields; sorted by them, weights numerically, unknowns last."""
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(run[k] for k in keys)].append(run)

    def order(item):
        values = zip(keys, item[0])
        return tuple(
            (v is None, list(CONDITIONS).index(v) if k == "class_noun_condition" else v or 0) for k, v in values
        )

    return sorted(groups.items(), key=order)


def trained_first(groups: list[tuple[tuple, list[dict]]]) -> list[tuple[tuple, list[dict]]]:
    """Groups of trained runs, then the control rows; each part in its order."""
    return sorted(groups, key=lambda item: item[1][0]["control"])


def _paper_rows(table: str) -> list[dict]:
    spec = TABLES[table]
    rows = []
    for fields, values in spec["paper"]:
        row = {"source": "paper", "subjects": 30, **fields}
        for name in spec["metrics"]:
            row[f"{name}_mean"], row[f"{name}_se"] = values[name], None
        rows.append(row)
    return rows


def build_tables(runs: list[dict], controls: dict[str, ControlRow]) -> dict[str, list[dict]]:
    """Our rows then the paper's, per table."""
    correct = [r for r in runs if r["class_noun_condition"] == "correct"]
    real = [{**r, "dino": r.get("real_dino"), "clip_i": r.get("real_clip_i")} for r in runs]
    table1 = [{"source": "ours", "row": "Real Images", **summarize(real, ("dino", "clip_i")), "clip_t_mean": None}]
    tables = {"table1": table1, "table3": [], "table4": []}
    for (method, model, weight), group in trained_first(grouped(correct, TRAINING)):
        fields = {"source": "ours", "row": row_label(method, model, weight, controls), "method": method}
        fields |= {"model": model, "prior_weight": weight}
        table1.append({**fields, **summarize(group, TABLES["table1"]["metrics"])})
        tables["table3"].append({**fields, **summarize(group, TABLES["table3"]["metrics"])})
    for (*training, condition), group in trained_first(grouped(runs, (*TRAINING, "class_noun_condition"))):
        fields = dict(zip(TRAINING, training)) | {"class_noun_condition": condition}
        row = {"source": "ours", "row": run_label(group[0], controls), **fields}
        tables["table4"].append({**row, **summarize(group, TABLES["table4"]["metrics"])})
    return {name: rows + _paper_rows(name) for name, rows in tables.items()}


def unfilled_tables(runs: list[dict]) -> dict[str, str]:
    """Table -> why the sweep's axes leave it unfilled: an ablation needs trained runs (of one method and
    model) at two values of its axis. Table 1 is always filled."""
    trained = [r for r in runs if not r["control"]]
    correct = [r for r in trained if r["class_noun_condition"] == "correct"]
    weights = [{r["prior_weight"] for r in group} for _, group in grouped(correct, TRAINING[:2])]
    nouns = [{r["class_noun_condition"] for r in group} for _, group in grouped(trained, TRAINING)]
    unfilled = {}
    if not any(len(values) > 1 for values in weights):
        unfilled["table3"] = "every trained run has the same prior weight"
    if not any(len(values) > 1 for values in nouns):
        unfilled["table4"] = "every trained run has the same class noun in its instance prompt"
    return unfilled
