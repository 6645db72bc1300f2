"""Is the class prior a prior? The colours of class images ("a teapot") as the attribute probe reads them,
beside the pretraining set's colours of that class: prior preservation keeps what the class images show,
so a sampler that collapses them onto a few colours teaches the model a narrower class than it knew."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.toyworld import scenes


def colour_entropy(colours: list[str]) -> float:
    """Shannon entropy in bits of the colours' empirical distribution (log2 10 = 3.32 for 10 equal colours)."""
    counts = np.array(list(Counter(colours).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _summary(colours: list[str], classes: list[str] | None, cls: str) -> dict:
    counts = Counter(colours)
    row = {"entropy": colour_entropy(colours), "colours": dict(counts.most_common())}
    if classes is not None:
        row["class_correct"] = float(np.mean([c == cls for c in classes]))
    return row


def class_prior(data, attribute_probe, cfg: DictConfig, out: Path, size: int, seed: int) -> dict:
    """For each class and guidance scale, `cfg.images` class images (the class prompt, seeds from `seed`)
    read by the attribute probe, beside two references: the pretraining set's colours of the class (its
    labelled images) and the probe's reading of as many rendered instances of the class (the probe's own
    noise, which adds entropy)."""
    rng = np.random.default_rng(seed)
    colours = list(scenes.COLOURS)
    seeds = [seed + i for i in range(cfg.images)]
    result: dict = {"images": cfg.images, "max_entropy": math.log2(len(colours)), "classes": {}}
    pipe = load_pipeline(str(out / "pipeline"), device="cpu")
    for cls in cfg.classes:
        k = scenes.CLASSES.index(cls)
        named = data.colour[(data.cls == k) & (data.colour >= 0)]
        rendered = [
            scenes.render(scenes.sample_instance(rng, cls), scenes.sample_view(rng), size) for _ in range(cfg.images)
        ]
        read = attribute_probe.read(rendered)
        row = {
            "pretraining": _summary([colours[c] for c in named], None, cls),
            "rendered_read": _summary([r[2] for r in read], [r[0] for r in read], cls),
        }
        for guidance in cfg.guidance:
            settings = SamplerSettings(**{**OmegaConf.to_container(cfg.sampler), "guidance_scale": guidance})
            prompts = [scenes.caption(cls)] * cfg.images  # "a teapot", the class prompt of conf/train.yaml
            with torch.no_grad():
                images = [im for _, im in render(pipe, prompts, seeds, settings, desc=f"{cls} g{guidance:g}")]
            read = attribute_probe.read(images)
            row[f"guidance {guidance:g}"] = _summary([r[2] for r in read], [r[0] for r in read], cls)
        result["classes"][cls] = row
    return result


def prior_table(result: dict) -> str:
    """Colour entropy (bits) and the share read as the class, one row per class and source."""
    lines = [
        f"| class | source ({result['images']} images) | colour entropy (bits, max {result['max_entropy']:.2f}) "
        "| read as the class | colours read |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for cls, rows in result["classes"].items():
        for source, r in rows.items():
            correct = f"{r['class_correct']:.0%}" if "class_correct" in r else ""
            top = ", ".join(f"{c} {n}" for c, n in r["colours"].items())
            lines.append(f"| {cls} | {source} | {r['entropy']:.2f} | {correct} | {top} |")
    return "\n".join(lines) + "\n"


def save_prior(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prior.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "prior.md").write_text(prior_table(result))
