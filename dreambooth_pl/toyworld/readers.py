"""The readers stage: does each evaluator read what its column claims, on instances no model trained on?

Subject fidelity (the DINO stand-in for DINO and PRES; the toy CLIP's image tower for CLIP-I): an instance
with a pattern pretraining never draws (as a subject's) is photographed as the subjects are, in an everyday
setting (the anchor), then in an evaluation context (the positive), and a look-alike is photographed in
that same context with the same pose and background (the negative). A reader of the subject scores the
positive higher: it must win in `win_rate` of the pairs with a mean cosine gap of at least `gap`.
Look-alikes share the class and main colour and differ in one attribute (pattern, second colour,
proportions) or in all three.

Diversity (DIV's distance): two renders of one prompt with their own pose, layout and background must be
farther apart than a near-duplicate (the same render nudged by a couple of degrees and pixels), in
`win_rate` of the pairs; also with only the pose varied (same background).

Writes `<out>/readers/readers.json` and `readers.md` (the table docs/results/toy_world_build.md reads); the
report marks the columns of a reader that fails (readers.json beside the evaluated DINO model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from dreambooth_pl.evaluation.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    Preprocess,
    cosine_distance,
    lpips_input,
    vae_feature_distance,
)
from dreambooth_pl.toyworld import scenes


def identity_groups(
    rng: np.random.Generator,
    count: int,
    kinds: Sequence[str],
    size: int,
    patterns: Sequence[str] = scenes.SUBJECT_PATTERNS,
) -> list[list[Image.Image]]:
    """[anchors, positives, negatives]: instances photographed as a subject is (an everyday setting), the same
    instance in an evaluation context, and a look-alike of one of `kinds` posed exactly as it in that context.
    The readers stage tests on them; the DINO stage trains on others (its own seed, more patterns)."""
    anchors, positives, negatives = [], [], []
    contexts = scenes.CONTEXTS[1:]
    for _ in range(count):
        inst = scenes.sample_instance(rng, patterns=patterns)
        kind = kinds[rng.integers(len(kinds))]
        setting = scenes.PHOTO_SETTINGS[rng.integers(len(scenes.PHOTO_SETTINGS))]
        new_view = scenes.sample_view(rng, contexts[rng.integers(len(contexts))])
        anchors.append(scenes.render(inst, scenes.sample_view(rng, setting), size))
        positives.append(scenes.render(inst, new_view, size))
        negatives.append(scenes.render(scenes.lookalike(rng, inst, kind), new_view, size))
    return [anchors, positives, negatives]


def diversity_pairs(rng: np.random.Generator, count: int, size: int) -> list[list[Image.Image]]:
    """[firsts, varied, pose only, near-duplicates] of one prompt (instance and context) each."""
    firsts, varied, pose, near = [], [], [], []
    for _ in range(count):
        inst = scenes.sample_instance(rng)
        context = scenes.CONTEXTS[rng.integers(len(scenes.CONTEXTS))]
        view, other = scenes.sample_view(rng, context), scenes.sample_view(rng, context)
        firsts.append(scenes.render(inst, view, size))
        varied.append(scenes.render(inst, other, size))
        pose.append(scenes.render(inst, dataclasses.replace(other, seed=view.seed), size))
        near.append(scenes.render(inst, dataclasses.replace(view, angle=view.angle + 2, x=view.x + 0.02), size))
    return [firsts, varied, pose, near]


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return 1 - cosine_distance(a, b)


def validate_readers(cfg: DictConfig, out: Path, size: int, seed: int) -> dict:
    """Every reader's test (module docstring) on the models under `out`: the table's rows."""
    preprocess = Preprocess(**cfg.preprocess)
    dino = DinoEmbedder(str(out / "dino"), preprocess, cfg.batch_size, "cpu").images
    embedders: dict[tuple[str, tuple[str, ...]], Callable[[list[Image.Image]], Tensor]] = {
        ("DINO stand-in (DINO, PRES)", ("dino", "pres")): dino,
        ("toy CLIP (CLIP-I)", ("clip_i",)): ClipEmbedder(str(out / "clip"), preprocess, cfg.batch_size, "cpu").images,
    }
    rng = np.random.default_rng([seed, 17])  # its own stream: no stage's draws move
    rows = []
    for kind in scenes.LOOKALIKES:
        images = identity_groups(rng, cfg.pairs, [kind], size)
        for (reader, columns), embed in embedders.items():
            anchor, positive, negative = (embed(group) for group in images)
            gap = _cosine(anchor, positive) - _cosine(anchor, negative)
            rows.append(_row("identity", reader, columns, f"look-alike: other {kind}", gap, cfg.gap))
    vae = vae_feature_distance(str(out / "pipeline" / "vae"), "cpu")
    distances = {  # DIV's backends (eval.div.backend)
        ("toy VAE features, LPIPS-style (DIV)", "vae"): lambda group: (lpips_input(group), vae),
        ("1 - cosine of the DINO stand-in", "dino"): lambda group: (dino(group), cosine_distance),
    }
    firsts, varied, pose, near = diversity_pairs(rng, cfg.pairs, size)
    for (reader, backend), prepare in distances.items():
        (first, distance), (dup, _) = prepare(firsts), prepare(near)
        for name, group in (("varied pose, layout, background", varied), ("varied pose only", pose)):
            gap = distance(first, prepare(group)[0]) - distance(first, dup)
            row = _row("diversity", reader, ("div",), f"{name} vs near-duplicate", gap, None)
            rows.append({**row, "div_backend": backend})
    for row in rows:
        row["passes"] = row["win_rate"] >= cfg.win_rate and (row["gap_needed"] is None or row["gap"] >= cfg.gap)
    return {"rows": rows}


def save_readers(result: dict, cfg: DictConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "readers.json").write_text(json.dumps({"pairs": cfg.pairs, **result}, indent=2) + "\n")
    (folder / "readers.md").write_text(readers_table(result["rows"], cfg))


def _row(test: str, reader: str, columns: tuple[str, ...], case: str, gap: Tensor, gap_needed: float | None) -> dict:
    return {
        "test": test,
        "reader": reader,
        "columns": list(columns),  # the report's metrics this reader scores
        "case": case,
        "win_rate": float((gap > 0).float().mean()),
        "gap": float(gap.mean()),
        "gap_needed": gap_needed,
    }


def readers_table(rows: list[dict], cfg: DictConfig) -> str:
    lines = [
        f"| test | reader | case ({cfg.pairs} pairs) | wins | mean gap | passes |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        needed = f">= {cfg.win_rate:.0%}" + (f", gap >= {r['gap_needed']:g}" if r["gap_needed"] is not None else "")
        verdict = "yes" if r["passes"] else f"**no** (needs {needed})"
        cells = [r["test"], r["reader"], r["case"], f"{r['win_rate']:.0%}", f"{r['gap']:+.3f}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
