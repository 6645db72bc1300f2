"""Rows compared by per-subject paired differences with Student-t intervals.

Every row is scored on the same subjects (and seeds), and subjects differ far more from each other than
rows do, so rows are compared by per-subject differences, not by their unpaired standard errors.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from dreambooth_pl.reporting.controls import ControlRow
from dreambooth_pl.reporting.tables import CONDITIONS, METHODS, TABLES, TRAINING, grouped, row_label

PAIRED_COLUMNS = ["table", "comparison", "metric", "subjects", "mean", "ci_low", "ci_high", "excludes_0"]


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


def comparison_rank(method: str, controls: dict[str, ControlRow]) -> int:
    """Table 1's comparisons are A - B with A ranked first: ceilings, the methods, then the baselines (the one
    registered last first, so the base model, registered first, comes last)."""
    baselines = [m for m, row in controls.items() if not row.ceiling]
    if method in controls and controls[method].ceiling:
        return 0
    if method in baselines:
        return 2 + len(METHODS) + len(baselines) - baselines.index(method)  # the base model (first) last
    return 1 + list(METHODS).index(method) if method in METHODS else 1 + len(METHODS)


def _pairs(runs: list[dict], controls: dict[str, ControlRow]) -> list[tuple[str, str, list[dict], list[dict]]]:
    """(table, "A - B", runs of A, runs of B) for every comparison the tables invite: Table 1's rows against
    each other (methods and controls), Table 3's prior weights against lambda 0, Table 4's correct noun
    against none and wrong."""
    correct = [r for r in runs if r["class_noun_condition"] == "correct"]
    groups = sorted(
        grouped(correct, TRAINING), key=lambda item: (comparison_rank(item[0][0], controls), str(item[0][1:]))
    )
    pairs = []
    for i, ((method, model, weight), a) in enumerate(groups):
        for (other, other_model, other_weight), b in groups[i + 1 :]:
            first = row_label(method, model, weight, controls)
            second = row_label(other, other_model, other_weight, controls)
            if (method, model) != (other, other_model):
                pairs.append(("table1", f"{first} − {second}", a, b))
            elif weight and other_weight == 0:
                pairs.append(("table3", f"{first} − {second}", a, b))
            elif other_weight and weight == 0:
                pairs.append(("table3", f"{second} − {first}", b, a))
    by_condition = dict(grouped(runs, (*TRAINING, "class_noun_condition")))
    for (method, model, weight, condition), a in by_condition.items():
        if condition != "correct":
            continue
        for other in ("none", "wrong"):
            b = by_condition.get((method, model, weight, other))
            if b:
                label = f"{row_label(method, model, weight, controls)}: {CONDITIONS['correct']} − {CONDITIONS[other]}"
                pairs.append(("table4", label, a, b))
    return pairs


def paired_comparisons(runs: list[dict], controls: dict[str, ControlRow]) -> list[dict]:
    """One row per comparison and metric: the per-subject paired difference and its 95% t-interval."""
    rows = []
    for table, label, a, b in _pairs(runs, controls):
        for metric in TABLES[table]["metrics"]:
            found = paired_difference(_per_subject(a, metric), _per_subject(b, metric))
            if found is not None:
                low, high = found["ci_low"], found["ci_high"]
                excludes = None if low is None else (low > 0 or high < 0)
                rows.append({"table": table, "comparison": label, "metric": metric, **found, "excludes_0": excludes})
    return rows
