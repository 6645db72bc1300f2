"""The toy subjects, written in the DreamBooth dataset's layout so every subject-level tool reads them unchanged.

`<dataset>/<name>/NN.png` holds a subject's photos and `<dataset>/prompts_and_classes.txt` its class and
the evaluation prompts, in the published file's format: DreamBench's prompts restricted to the contexts
and colours the toy world can show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dreambooth_pl.export import write_dir_atomically
from dreambooth_pl.toyworld import scenes

# DreamBench's live-subject list begins with these ten contexts; its outfits are beyond the toy renderer.
LIVE_CONTEXTS = 10
PROMPT_COLOURS = ("red", "purple")


def subject_instance(spec: DictConfig) -> scenes.Instance:
    if spec.pattern not in scenes.SUBJECT_PATTERNS:
        raise ValueError(
            f"toyworld subject {spec.name!r}: pattern {spec.pattern!r} is one pretraining renders; "
            f"a subject needs one it never does: {list(scenes.SUBJECT_PATTERNS)}"
        )
    return scenes.Instance(spec.cls, spec.colour, spec.second, spec.pattern, tuple(spec.shape))


def subject_views(spec: DictConfig) -> list[scenes.View]:
    """Studio photos, as the DreamBooth dataset's are: pose, scale and background vary, not the context."""
    rng = np.random.default_rng(spec.seed)
    return [scenes.sample_view(rng, "") for _ in range(spec.views)]


def _prompt_lines(templates: Sequence[str]) -> list[str]:
    body = [f"'{t}'.format(unique_token, class_token)," for t in templates]
    body[-1] = body[-1].rstrip(",")
    return ["prompt_list = [", *body, "]"]


def prompts_and_classes(subjects: Sequence[DictConfig]) -> str:
    contexts = [f"a {{0}} {{1}} {c}" for c in scenes.CONTEXTS[1:]]
    colours = [f"a {c} {{0}} {{1}}" for c in PROMPT_COLOURS]
    lines = ["Classes", "", "subject_name,class", *(f"{s.name},{s.cls}" for s in subjects), "", "Prompts", ""]
    lines += ["Object Prompts", "", *_prompt_lines(contexts + colours), ""]
    lines += ["Live Subject Prompts", "", *_prompt_lines(contexts[:LIVE_CONTEXTS] + colours), ""]
    return "\n".join(lines)


def write_subjects(subjects: Sequence[DictConfig], dataset_dir: str | Path, size: int) -> Path:
    """The whole dataset folder at once (every subject and the prompts file, or the old folder untouched)."""

    def write(staging: Path) -> None:
        for spec in subjects:
            inst = subject_instance(spec)
            (staging / spec.name).mkdir()
            for i, view in enumerate(subject_views(spec)):
                scenes.render(inst, view, size).save(staging / spec.name / f"{i:02d}.png")
        (staging / "prompts_and_classes.txt").write_text(prompts_and_classes(subjects))

    return write_dir_atomically(dataset_dir, write)
