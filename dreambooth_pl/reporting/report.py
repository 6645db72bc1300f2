"""Tables in the layout of the paper (Ruiz et al. 2023, Tables 1, 3 and 4) from evaluated runs.

`python -m dreambooth_pl.report <multirun dir or run dirs or metrics.json files...> [-o OUT]` finds every
`eval/metrics.json`, groups the runs by how they were trained (method, model, prior weight, class noun in
the instance prompt, all read from the files' metadata), averages per subject first and then reports the
mean and standard error over subjects, with the paper's published numbers beside ours, labelled "paper".
Rows are compared by per-subject paired differences with 95% t-intervals ("Paired differences").
Writes report.md, table1.csv, table3.csv, table4.csv, paired.csv, runs.csv (one row per run) and, where a
subject has a base-model evaluation and DreamBooth runs with and without prior preservation,
language_drift.png.

`SweepReport`, a Hydra callback (experiment=toy_paper), evaluates the control rows (base model; for toy
subjects also base model + attribute words, the renderer's ground truth and its look-alike) on the swept
subjects when a sweep ends and writes the report into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dreambooth_pl.util.images import image_grid, load_rgb, save_atomically

METRICS_FILE = "metrics.json"
LABELS = {
    "pres": "PRES",
    "div": "DIV",
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
}
BASE = "base"  # the method of a base-model evaluation: nothing was fine-tuned
# control rows (toy subjects): the base model prompted with the subject's attributes instead of the identifier,
# the renderer's own drawing of the subject in each prompt's context (the ceiling), and its drawing of a
# look-alike (same class and main colour, another pattern, second colour and proportions) in the same places
ATTRIBUTE_WORDS, RENDERER, LOOKALIKE = "attribute_words", "renderer", "renderer_lookalike"
CONTROLS = {
    ATTRIBUTE_WORDS: "Base model + attribute words",
    RENDERER: "Renderer ground truth",
    LOOKALIKE: "Renderer look-alike",
}
METHODS = {
    BASE: "Base model",
    **CONTROLS,
    "dreambooth": "DreamBooth",
    "lora": "LoRA DreamBooth",
    "textual_inversion": "Textual Inversion",
}
# Table 1's comparisons are A - B with A earlier here: the ceiling first, the baselines last.
COMPARISON_ORDER = (RENDERER, "dreambooth", "lora", "textual_inversion", LOOKALIKE, ATTRIBUTE_WORDS, BASE)
CONDITIONS = {"correct": "Correct Class", "none": "No Class", "wrong": "Wrong Class"}

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
        "paper": [
            ({"row": "Correct Class (Imagen)", "class_noun_condition": "correct"}, {"dino": 0.744, "clip_i": 0.853}),
            ({"row": "No Class (Imagen)", "class_noun_condition": "none"}, {"dino": 0.303, "clip_i": 0.607}),
            ({"row": "Wrong Class (Imagen)", "class_noun_condition": "wrong"}, {"dino": 0.454, "clip_i": 0.728}),
        ],
    },
}
PAIRED_COLUMNS = ["table", "comparison", "metric", "subjects", "mean", "ci_low", "ci_high", "excludes_0"]
KEY_COLUMNS = ["source", "row", "method", "model", "prior_weight", "class_noun_condition", "subjects", "runs"]


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """metrics.json files given directly, or every eval/metrics.json below the given folders."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob(METRICS_FILE) if p.parent.name == "eval")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


class ReportInputError(ValueError):
    """A file the report reads is damaged; it is named and left out."""


def load_runs(files: list[Path]) -> tuple[list[dict], list[str]]:
    """The runs that can be read, and a line for each file that cannot."""
    runs, damaged = [], []
    for path in files:
        try:
            runs.append(load_run(path))
        except ReportInputError as err:
            damaged.append(f"{err}: left out; evaluate the run again")
    return runs, damaged


def load_run(path: Path) -> dict:
    """One flat row: the metadata the report groups by, the metrics and where the run's grid is."""
    try:
        record = json.loads(path.read_text())
        meta = record["metadata"]
        record["metrics"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReportInputError(f"{path} is not a whole evaluation record ({type(err).__name__}: {err})") from None
    weight = meta.get("prior_weight")
    prior_weight = 0.0 if meta.get("prior_enabled") is False else (None if weight is None else float(weight))
    return {
        "run": str(path.parent.parent),
        "subject": meta["subject"],
        "method": meta.get("method") or "dreambooth",
        "model": meta.get("model") or "unknown",
        "prior_weight": prior_weight,
        "class_noun_condition": meta["class_noun_condition"],
        "class_noun": meta["class_noun"],
        "instance_class_noun": meta["instance_class_noun"],
        "identifier": meta["identifier"],
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


def _label(method: str, model: str, prior_weight: float | None) -> str:
    if method == BASE:
        return f"{METHODS[BASE]} ({model}, no fine-tuning)"
    if method == ATTRIBUTE_WORDS:
        return f"{METHODS[method]} ({model}, no fine-tuning; control)"
    if method == RENDERER:
        return f"{METHODS[method]} (the subject in each prompt's context; control)"
    if method == LOOKALIKE:
        return f"{METHODS[method]} (another object of the class and colour, drawn as the subject; control)"
    if prior_weight is None:
        prior = "prior unknown"
    else:
        prior = f"PPL λ={prior_weight:g}" if prior_weight > 0 else "no PPL"
    return f"{METHODS.get(method, method)} ({model}, {prior})"


def _grouped(runs: list[dict], keys: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
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


def _paper_rows(table: str) -> list[dict]:
    spec = TABLES[table]
    rows = []
    for fields, values in spec["paper"]:
        row = {"source": "paper", "subjects": 30, **fields}
        for name in spec["metrics"]:
            row[f"{name}_mean"], row[f"{name}_se"] = values[name], None
        rows.append(row)
    return rows


def build_tables(runs: list[dict]) -> dict[str, list[dict]]:
    """Our rows then the paper's, per table."""
    training = ("method", "model", "prior_weight")
    correct = [r for r in runs if r["class_noun_condition"] == "correct"]
    real = [{**r, "dino": r.get("real_dino"), "clip_i": r.get("real_clip_i")} for r in runs]
    table1 = [{"source": "ours", "row": "Real Images", **summarize(real, ("dino", "clip_i")), "clip_t_mean": None}]
    tables = {"table1": table1, "table3": [], "table4": []}
    for (method, model, weight), group in _grouped(correct, training):
        fields = {"source": "ours", "row": _label(method, model, weight), "method": method, "model": model}
        table1.append({**fields, "prior_weight": weight, **summarize(group, TABLES["table1"]["metrics"])})
        tables["table3"].append({**fields, "prior_weight": weight, **summarize(group, TABLES["table3"]["metrics"])})
    for (method, model, weight, condition), group in _grouped(runs, (*training, "class_noun_condition")):
        untrained = method in (BASE, *CONTROLS)  # prompted with the class noun, not trained with one
        noun = "" if untrained else f": {CONDITIONS.get(condition, condition)}"
        tables["table4"].append(
            {
                "source": "ours",
                "row": f"{_label(method, model, weight)}{noun}",
                "method": method,
                "model": model,
                "prior_weight": weight,
                "class_noun_condition": condition,
                **summarize(group, TABLES["table4"]["metrics"]),
            }
        )
    return {name: rows + _paper_rows(name) for name, rows in tables.items()}


# --------------------------------------------------------------------------- paired comparisons
# Every row is scored on the same subjects (and seeds), and subjects differ far more from each other than
# rows do, so rows are compared by per-subject differences, not by their unpaired standard errors.


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer df: the closed-form finite sums (Abramowitz-Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, total, term = math.cos(theta) ** 2, 0.0, 1.0
    if df % 2:
        for k in range((df - 1) // 2):
            total, term = total + term, term * (2 * k + 2) / (2 * k + 3) * c2
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    for k in range(df // 2):
        total, term = total + term, term * (2 * k + 1) / (2 * k + 2) * c2
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 0.5) of Student's t by bisection on its exact CDF: no SciPy needed."""
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, df) < 2 * p - 1:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central_mass(mid, df) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: dict[str, float], b: dict[str, float], level: float = 0.95) -> dict | None:
    """Mean of the per-subject differences a - b over the subjects both have, with its t-interval."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"subjects": 1, "mean": mean, "ci_low": None, "ci_high": None}
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"subjects": len(diffs), "mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def _per_subject(runs: list[dict], metric: str) -> dict[str, float]:
    """Each subject's mean over its runs (seeds)."""
    by_subject = defaultdict(list)
    for run in runs:
        if run.get(metric) is not None and math.isfinite(run[metric]):
            by_subject[run["subject"]].append(run[metric])
    return {subject: statistics.fmean(values) for subject, values in by_subject.items()}


def _pairs(runs: list[dict]) -> list[tuple[str, str, list[dict], list[dict]]]:
    """(table, "A - B", runs of A, runs of B) for every comparison the tables invite: Table 1's rows against
    each other (methods and controls), Table 3's prior weights against lambda 0, Table 4's correct noun
    against none and wrong."""
    order = list(COMPARISON_ORDER)
    training = ("method", "model", "prior_weight")
    correct = [r for r in runs if r["class_noun_condition"] == "correct"]
    groups = sorted(
        _grouped(correct, training),
        key=lambda item: (order.index(item[0][0]) if item[0][0] in order else len(order), str(item[0][1:])),
    )
    pairs = []
    for i, ((method, model, weight), a) in enumerate(groups):
        for (other, other_model, other_weight), b in groups[i + 1 :]:
            label = f"{_label(method, model, weight)} − {_label(other, other_model, other_weight)}"
            if (method, model) != (other, other_model):
                pairs.append(("table1", label, a, b))
            elif weight and other_weight == 0:
                pairs.append(("table3", label, a, b))
            elif other_weight and weight == 0:
                pairs.append(("table3", f"{_label(other, model, other_weight)} − {_label(method, model, 0.0)}", b, a))
    by_condition = dict(_grouped(runs, (*training, "class_noun_condition")))
    for (method, model, weight, condition), a in by_condition.items():
        if condition != "correct":
            continue
        for other in ("none", "wrong"):
            b = by_condition.get((method, model, weight, other))
            if b:
                label = f"{_label(method, model, weight)}: {CONDITIONS['correct']} − {CONDITIONS[other]}"
                pairs.append(("table4", label, a, b))
    return pairs


def paired_comparisons(runs: list[dict]) -> list[dict]:
    """One row per comparison and metric: the per-subject paired difference and its 95% t-interval."""
    rows = []
    for table, label, a, b in _pairs(runs):
        for metric in TABLES[table]["metrics"]:
            found = paired_difference(_per_subject(a, metric), _per_subject(b, metric))
            if found is not None:
                low, high = found["ci_low"], found["ci_high"]
                excludes = None if low is None else (low > 0 or high < 0)
                rows.append({"table": table, "comparison": label, "metric": metric, **found, "excludes_0": excludes})
    return rows


def _marked_labels(runs: list[dict], labels: dict[str, str]) -> dict[str, str]:
    """Column headers with the metrics whose reader failed its validation marked."""
    failed = unvalidated_columns(runs)
    return {name: f"{label} (reader NOT validated)" if name in failed else label for name, label in labels.items()}


def paired_markdown(rows: list[dict], labels: dict[str, str]) -> str:
    lines = [
        "",
        "## Paired differences",
        "",
        "Row A − row B per subject (each subject's runs averaged first), then the mean over the subjects both",
        "rows have, with a 95% Student-t interval; **bold**: the interval excludes 0 (a difference the data",
        "support), otherwise the rows are not told apart. With one subject there is no interval.",
        "",
        "| table | comparison (A − B) | metric | subjects | difference | 95% interval |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        interval = "n/a" if row["ci_low"] is None else f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        mean = f"{row['mean']:+.3f}"
        cells = [row["table"], row["comparison"], labels[row["metric"]], str(row["subjects"])]
        cells += [f"**{mean}**" if row["excludes_0"] else mean, interval]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict, name: str) -> str:
    mean, se = row.get(f"{name}_mean"), row.get(f"{name}_se")
    if mean is None:
        return "N/A"
    return f"{mean:.3f} ± {se:.3f}" if se is not None else f"{mean:.3f}"


READERS_FILE = Path("readers") / "readers.json"  # the toy world's readers stage, beside its dino/ folder


def unvalidated_columns(runs: list[dict]) -> dict[str, str]:
    """Metric -> the readers table whose test its reader failed (`readers.json` beside the runs' DINO model,
    written by the toy world's readers stage); metrics with no such table are not judged here."""
    failed = {}
    for run in runs:
        if not run.get("dino_model"):
            continue
        table = Path(run["dino_model"]).parent / READERS_FILE
        if not table.is_file():
            continue
        for row in json.loads(table.read_text())["rows"]:
            if not row["passes"] and row.get("div_backend", run["div_backend"]) == run["div_backend"]:
                failed.update(dict.fromkeys(row["columns"], str(table)))
    return failed


def div_label(backends: Sequence[str]) -> str:
    """The DIV column's header says when our numbers are not the paper's LPIPS."""
    if any(b != "lpips" for b in backends):
        return f"DIV ({'/'.join(backends)}: NOT LPIPS, compare directions only)"
    return "DIV"


def markdown(tables: dict[str, list[dict]], runs: list[dict], sources: Sequence[str]) -> str:
    backends = sorted({r["div_backend"] for r in runs if r["div_backend"]})
    labels = _marked_labels(runs, {**LABELS, "div": div_label(backends)})
    lines = [
        "# DreamBooth evaluation report",
        "",
        f"{len(runs)} run(s) of {len({r['subject'] for r in runs})} subject(s), from {', '.join(map(str, sources))}.",
        "Scores are raw cosine similarities (the paper's scale); ± is the standard error over subjects (runs of",
        "one subject are averaged first). Rows marked *paper* are the published numbers (Ruiz et al. 2023),",
        "measured with Imagen or Stable Diffusion on 30 subjects x 25 prompts x 4 images; they are not ours.",
        f"DIV backend: {', '.join(backends) or 'n/a'}"
        + (
            " (1 - cosine of DINO features: the paper's DIV is LPIPS, compare directions only)."
            if "dino" in backends
            else "."
        ),
    ]
    failed = unvalidated_columns(runs)
    if failed:
        names = ", ".join(LABELS[m] for m in LABELS if m in failed)
        where = sorted(set(failed.values()))[0]
        lines.append(f"NOT VALIDATED: {names}: their readers failed the readers test in {where}.")
    if "vae" in backends:
        lines.append(
            "DIV vae: an LPIPS-style distance on the toy VAE encoder's feature maps (no learned weights); not the"
            " paper's LPIPS scale."
        )
    for name, rows in tables.items():
        metrics = TABLES[name]["metrics"]
        lines += ["", f"## {TABLES[name]['title']}", ""]
        lines.append("| source | row | subjects | runs | " + " | ".join(labels[m] for m in metrics) + " |")
        lines.append("|" + " --- |" * (4 + len(metrics)))
        for row in rows:
            source = "*paper*" if row["source"] == "paper" else "ours"
            runs_cell = row.get("runs", "")
            cells = [source, row["row"], str(row["subjects"]), str(runs_cell), *(_cell(row, m) for m in metrics)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(paths: Sequence[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Write report.md and the CSV tables; return their paths by name."""
    files = find_metrics(paths)
    if not files:
        gaps = [line for path in map(Path, paths) if path.is_dir() for line in sweep_gaps(path, [])]
        raise FileNotFoundError(
            f"No eval/metrics.json under {', '.join(map(str, paths))}: evaluate the runs first."
            + "".join(f"\n  {gap}" for gap in gaps)
        )
    runs, damaged = load_runs(files)
    if not runs:
        raise FileNotFoundError("No readable eval/metrics.json: " + "; ".join(damaged))
    gaps = damaged + [line for path in map(Path, paths) if path.is_dir() for line in sweep_gaps(path, runs)]
    tables = build_tables(runs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"report": out / "report.md", "runs": out / "runs.csv"}
    drift = language_drift_grid(runs)
    if drift is not None:
        written["language_drift"] = save_atomically(drift, out / "language_drift.png")
    paired = paired_comparisons(runs)
    backends = sorted({r["div_backend"] for r in runs if r["div_backend"]})
    labels = _marked_labels(runs, {**LABELS, "div": div_label(backends)})
    paired_text = paired_markdown(paired, labels) if paired else ""
    written["report"].write_text(with_gaps(markdown(tables, runs, paths) + paired_text, gaps) + _drift_note(written))
    _write_csv(runs, [k for k in runs[0] if k != "pres_images"], written["runs"])
    for name, rows in tables.items():
        stats = [f"{m}_{s}" for m in TABLES[name]["metrics"] for s in ("mean", "se")]
        written[name] = out / f"{name}.csv"
        _write_csv(rows, KEY_COLUMNS + stats, written[name])
    written["paired"] = out / "paired.csv"
    _write_csv(paired, PAIRED_COLUMNS, written["paired"])
    return written


def language_drift_grid(runs: list[dict], columns: int = 8) -> Image.Image | None:
    """The paper's language-drift picture: "a [class noun]" (the PRES images, same seeds) from the base model,
    after DreamBooth without prior preservation and with it; three rows per subject, the lowest seed's runs."""

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


def drift_candidates(runs: list[dict], subject: str) -> dict[str, list[dict]]:
    """A subject's runs that can fill each row of its language-drift grid."""
    mine = [r for r in runs if r["subject"] == subject and r["class_noun_condition"] == "correct"]
    dreambooth = [r for r in mine if r["method"] == "dreambooth"]
    return {
        "base model": [r for r in mine if r["method"] == BASE],
        "DreamBooth, no prior preservation (lambda=0)": [r for r in dreambooth if r["prior_weight"] == 0],
        "DreamBooth, prior preservation (lambda=1)": [r for r in dreambooth if (r["prior_weight"] or 0) > 0],
    }


def sweep_gaps(sweep_dir: Path, runs: list[dict]) -> list[str]:
    """What a sweep's report lacks: failed jobs, jobs without an evaluation, subjects without a base-model
    row, language-drift rows that cannot be drawn. Empty for a folder that is not a sweep."""
    from dreambooth_pl.runs.records import load_mapping, select
    from dreambooth_pl.runs.sweeps import expected_jobs, failed_jobs, one_line

    if not (sweep_dir / "multirun.yaml").is_file():
        return []
    gaps = []
    failed = failed_jobs(sweep_dir)
    for record in failed:
        gaps.append(f"job {record['job']} ({' '.join(record['overrides'])}) failed: {one_line(record['error'])}")
    evaluated = {Path(r["run"]).resolve() for r in runs}
    failed_folders = {Path(r["folder"]).resolve() for r in failed if "folder" in r}
    hydra = load_mapping(sweep_dir / "multirun.yaml").get("hydra") or {}  # data: never resolved
    jobs = expected_jobs(sweep_dir) if select(hydra, "sweep.subdir") == "${hydra.job.num}" else None
    if jobs is None:
        gaps.append(f"the sweep's jobs cannot be listed from {sweep_dir / 'multirun.yaml'}: missing jobs not checked")
    for num, overrides in enumerate(jobs or []):
        folder = (sweep_dir / str(num)).resolve()
        if folder in evaluated or folder in failed_folders:
            continue
        state = "never started" if not folder.is_dir() else "no eval/metrics.json (stopped, or not evaluated)"
        gaps.append(f"job {num} ({' '.join(overrides)}): {state}")
    subjects = sorted({r["subject"] for r in runs if r["method"] != BASE})
    callbacks = [c for c in (hydra.get("callbacks") or {}).values() if isinstance(c, dict)]
    reports = [c for c in callbacks if "SweepReport" in str(c.get("_target_"))]
    if any(c.get("base_model") for c in reports):
        base = {r["subject"] for r in runs if r["method"] == BASE}
        missing = [s for s in subjects if s not in base]
        if missing:
            gaps.append(
                f"base model row: not evaluated for {', '.join(missing)} (the sweep stopped or failed "
                "in its base-model evaluation): Table 1's base row and the drift grid lack them"
            )
    for subject in subjects:
        rows = drift_candidates(runs, subject)
        lacking = [name for name, candidates in rows.items() if not any(r["pres_images"] for r in candidates)]
        if lacking and len(lacking) < len(rows):
            gaps.append(f"language-drift grid: no rows for {subject} (missing: {'; '.join(lacking)})")
    return gaps


def with_gaps(report: str, gaps: list[str]) -> str:
    """The report with what it lacks listed under its title, before any table."""
    if not gaps:
        return report
    title, _, rest = report.partition("\n")
    section = ["", "## Missing from this report", "", *(f"- {gap}" for gap in gaps)]
    return "\n".join([title, *section, ""]) + rest


def _drift_note(written: dict[str, Path]) -> str:
    if "language_drift" not in written:
        return ""
    return (
        "\n## Language drift\n\n"
        'Each subject\'s "a [class noun]" from the same seeds: base model, DreamBooth without prior preservation,\n'
        f"DreamBooth with it: ![language drift]({written['language_drift'].name})\n"
    )


class SweepReport(Callback):
    """When a sweep ends: evaluate the control rows on the swept subjects, then write the report into
    `<sweep dir>/report`. The base model with the runs' identifier is Table 1's reference row and the
    language-drift grid's first row; for toy subjects (subjects.json beside their photos) also the base model
    prompted with `attribute_words` (filled from the subject's description, e.g. "{colour}": "a blue teapot
    in the jungle") in place of the identifier, the baseline personalization must beat, and the renderer's
    ground truth, the ceiling, and its look-alike, what an image right in all but the subject scores."""

    def __init__(self, base_model: str | dict | None = None, attribute_words: str | None = None) -> None:
        self.base_model = base_model
        self.attribute_words = attribute_words

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs, _ = load_runs(find_metrics([sweep_dir]))
        if not runs:
            print(f"[report] no evaluated runs under {sweep_dir}: nothing to report")
            return
        written = write_report([sweep_dir], sweep_dir / "report")  # a stop during the base evaluation keeps it
        if self.base_model:
            self.evaluate_controls(config, sweep_dir, [r for r in runs if r["method"] not in (BASE, *CONTROLS)])
            written = write_report([sweep_dir], sweep_dir / "report")
        print(f"[report] {written['report']}")

    def evaluate_controls(self, config: DictConfig, sweep_dir: Path, runs: list[dict]) -> None:
        from dreambooth_pl.util.config import resolve_path
        from dreambooth_pl.evaluation.evaluate import evaluate_run  # diffusers and transformers load only here
        from dreambooth_pl.toyworld.subjects import GroundTruth

        base_model = resolve_path(self.base_model)  # a folder, or the tiny model's `_target_` that builds one
        eval_cfg = OmegaConf.to_container(config.eval, resolve=True)
        model = OmegaConf.select(config, "model.name")
        for subject in sorted({r["subject"] for r in runs}):
            run = next(r for r in runs if r["subject"] == subject)

            def control(method: str, pipeline: str | None, identifier: str, draw=None, run=run) -> None:
                evaluate_run(
                    pipeline,
                    str(sweep_dir / method / run["subject"]),
                    eval_cfg,
                    run["real_images_dir"],
                    run["subject"],
                    run["class_noun"],
                    identifier,
                    run_meta={"method": method, "model": model, "steps": 0},
                    draw=draw,
                )

            control(BASE, base_model, run["identifier"])
            truth = GroundTruth.of(run["real_images_dir"], run["identifier"])
            if truth is None:
                continue
            if self.attribute_words:
                words = self.attribute_words.format(**dataclasses.asdict(truth.instance))
                control(ATTRIBUTE_WORDS, base_model, words)
            control(RENDERER, None, run["identifier"], draw=truth)
            control(LOOKALIKE, None, run["identifier"], draw=truth.lookalike())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_pl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="a multirun folder, run folders, or metrics.json files")
    parser.add_argument(
        "-o", "--output", help="where to write (default: <the folder>/report for one folder, else ./report)"
    )
    args = parser.parse_args(argv)
    default = (
        Path(args.paths[0]) / "report" if len(args.paths) == 1 and Path(args.paths[0]).is_dir() else Path("report")
    )
    try:
        written = write_report(args.paths, args.output or default)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(written["report"].read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
