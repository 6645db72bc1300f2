"""The toy subjects, written in the DreamBooth dataset's layout so every subject-level tool reads them unchanged.

`<dataset>/<name>/NN.png` holds a subject's photos and `<dataset>/prompts_and_classes.txt` its class and
the evaluation prompts, in the published file's format: DreamBench's prompts restricted to the contexts
and colours the toy world can show. `<dataset>/subjects.json` is the renderer's description of each
subject (class, colours, pattern, proportions), from which the report draws its ground-truth row and the
attribute words of its base-model control.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from dreambooth_pl.runs.export import write_dir_atomically
from dreambooth_pl.toyworld import scenes

# DreamBench's live-subject list begins with these ten contexts; its outfits are beyond the toy renderer.
LIVE_CONTEXTS = 10
PROMPT_COLOURS = ("red", "purple")
PHOTO_SETTINGS_PER_SUBJECT = 3
SUBJECTS_FILE = "subjects.json"


def subject_instance(spec: DictConfig) -> scenes.Instance:
    if spec.pattern not in scenes.SUBJECT_PATTERNS:
        raise ValueError(
            f"toyworld subject {spec.name!r}: pattern {spec.pattern!r} is one pretraining renders; "
            f"a subject needs one it never does: {list(scenes.SUBJECT_PATTERNS)}"
        )
    return scenes.Instance(spec.cls, spec.colour, spec.second, spec.pattern, tuple(spec.shape))


def subject_views(spec: DictConfig) -> list[scenes.View]:
    """Photos as the DreamBooth dataset's are: a few everyday settings (never an evaluation context) and
    poses, so what stays constant across them is the subject, not a background."""
    rng = np.random.default_rng(spec.seed)
    settings = rng.choice(scenes.PHOTO_SETTINGS, PHOTO_SETTINGS_PER_SUBJECT, replace=False)
    return [scenes.sample_view(rng, str(settings[i % len(settings)])) for i in range(spec.views)]


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


def _write_photos(spec: DictConfig, folder: Path, size: int, crop: float = 1.0) -> None:
    inst = subject_instance(spec)
    folder.mkdir()
    for i, view in enumerate(subject_views(spec)):
        scenes.render(inst, dataclasses.replace(view, crop=crop), size).save(folder / f"{i:02d}.png")


def write_subjects(subjects: Sequence[DictConfig], dataset_dir: str | Path, size: int) -> Path:
    """The whole dataset folder at once (every subject and the prompts file, or the old folder untouched)."""

    def write(staging: Path) -> None:
        for spec in subjects:
            _write_photos(spec, staging / spec.name, size)
        (staging / "prompts_and_classes.txt").write_text(prompts_and_classes(subjects))
        described = {s.name: dataclasses.asdict(subject_instance(s)) for s in subjects}
        (staging / SUBJECTS_FILE).write_text(json.dumps({"size": size, "subjects": described}, indent=2) + "\n")

    return write_dir_atomically(dataset_dir, write)


def write_closeups(subjects: Sequence[DictConfig], closeups_dir: str | Path, size: int, crop: float) -> Path:
    """The same photos as close-ups framing the middle `crop` of the subject's height: its colours and pattern
    without the outline and proportions that make it a teapot, which only the class noun can then supply
    (the paper's Table 4 mechanism, experiment=toy_closeup)."""

    def write(staging: Path) -> None:
        for spec in subjects:
            _write_photos(spec, staging / spec.name, size, crop)

    return write_dir_atomically(closeups_dir, write)


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """What a perfect model draws for an evaluation prompt: the subject, posed by the image's seed, in the
    prompt's context and in the colour the prompt names ("a red sks teapot"). A prompt without the identifier
    (PRES's "a teapot") gets an instance of the class from the pretraining distribution, on the studio
    background its caption means."""

    instance: scenes.Instance
    identifier: str
    size: int

    @classmethod
    def of(cls, photos_dir: str | Path, identifier: str) -> GroundTruth | None:
        """The toy subject whose photos these are (subjects.json beside them); None for any other subject."""
        photos = Path(photos_dir)
        described = photos.parent / SUBJECTS_FILE
        if not described.is_file():
            return None
        spec = json.loads(described.read_text())
        found = spec["subjects"].get(photos.name)
        if found is None:
            return None
        instance = scenes.Instance(**{k: tuple(v) if isinstance(v, list) else v for k, v in found.items()})
        return cls(instance, identifier, spec["size"])

    def lookalike(self) -> GroundTruth:
        """The same drawing of a look-alike (same class and main colour; another pattern, second colour and
        proportions, fixed per subject): what a model scores that gets everything right but the subject."""
        rng = np.random.default_rng(zlib.crc32(repr(self.instance).encode()))
        return dataclasses.replace(self, instance=scenes.lookalike(rng, self.instance, "all three"))

    def fingerprint(self) -> dict:
        """Its value (the dataclass's repr) and the source of the toy world that draws it: the key of its cached
        evaluations (evaluation.render.ImageProducer)."""
        code = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
        return {"draw": repr(self), "code": hashlib.sha256(code).hexdigest()[:16]}

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        words = prompt.split()
        if self.identifier not in words:
            instance = scenes.sample_instance(rng, self.instance.cls)
            return scenes.render(instance, scenes.sample_view(rng, ""), self.size)
        at = words.index(self.identifier)
        colour = words[at - 1] if at >= 2 and words[at - 1] in scenes.COLOURS else None
        rest = words[at + 1 :]
        context = " ".join(rest[1:] if rest[:1] == [self.instance.cls] else rest)
        if context not in scenes.CONTEXTS:
            raise ValueError(f"renderer ground truth: {prompt!r} names no context the toy renderer draws")
        instance = self.instance.recoloured(colour) if colour else self.instance
        return scenes.render(instance, scenes.sample_view(rng, context), self.size)
