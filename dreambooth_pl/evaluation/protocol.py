"""The DreamBooth dataset's evaluation protocol text: its class table and its two lists of 25 prompts.

Read from the dataset's own `prompts_and_classes.txt` rather than copied here, so the prompts are
exactly the published ones. Live subjects (cats and dogs) get prompts about outfits and accessories,
objects get prompts about materials and surroundings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.util.config import ConfigError

_FORMAT_CALL = re.compile(r"""^'(?P<template>.*)'\.format\(unique_token, class_token\),?$""")
_SECTIONS = {"Object Prompts": "object", "Live Subject Prompts": "live"}
# Image i of prompt p uses seed + SEED_STRIDE * p + i: asking for more images per prompt later keeps the
# earlier ones (and their files) valid.
SEED_STRIDE = 1000


@dataclass(frozen=True)
class EvalPrompt:
    index: int  # position in the published list: seeds and file names depend on it, not on the subset
    template: str  # with {identifier} and {class_noun}
    text: str  # what the model is prompted with
    clip_text: str  # for CLIP-T: without the identifier (CLIP has never seen "sks"), with the real class noun


class PromptsFileMissing(ConfigError, FileNotFoundError):
    """A setting (one line, no traceback) that is also the missing file it is."""


def _read(path: str | os.PathLike, option: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PromptsFileMissing(
            f"{option}={str(path)!r}: no such file. It ships with the DreamBooth dataset "
            "(git clone --depth 1 https://github.com/google/dreambooth); set paths.dreambooth_root or the option."
        )
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ConfigError(
            f"{option}={str(path)!r} is not a text file: expected the DreamBooth dataset's prompts_and_classes.txt."
        ) from None


def read_class_table(path: str | os.PathLike, option: str = "eval.prompts_file") -> dict[str, str]:
    """subject name -> class noun, from the `subject_name,class` table."""
    lines = _read(path, option)
    if "subject_name,class" not in lines:
        raise ConfigError(f"{option}={str(path)!r}: found no `subject_name,class` table in it.")
    table = {}
    for line in lines[lines.index("subject_name,class") + 1 :]:
        if not line:
            break
        if "," not in line:
            raise ConfigError(f"{option}={str(path)!r}: {line!r} in its class table is not `subject_name,class`.")
        name, noun = line.split(",", 1)
        table[name.strip()] = noun.strip()
    return table


def read_prompt_lists(path: str | os.PathLike, option: str = "eval.prompts_file") -> dict[str, list[str]]:
    """{"object": [...], "live": [...]}, each a list of templates using {identifier} and {class_noun}."""
    lists: dict[str, list[str]] = {}
    current = None
    for line in _read(path, option):
        if line in _SECTIONS:
            current = lists.setdefault(_SECTIONS[line], [])
        elif current is not None and (match := _FORMAT_CALL.match(line)):
            current.append(match["template"].replace("{0}", "{identifier}").replace("{1}", "{class_noun}"))
    if set(lists) != set(_SECTIONS.values()) or not all(lists.values()):
        raise ConfigError(f"{option}={str(path)!r}: found no {' and '.join(_SECTIONS)} lists in it.")
    return lists


def subject_prompts(
    prompts_file: str | os.PathLike,
    class_noun: str,
    identifier: str,
    instance_class_noun: str | None = None,
    live_classes: tuple[str, ...] | list[str] = ("cat", "dog"),
    num_prompts: int | None = None,
) -> tuple[str, list[EvalPrompt]]:
    """The prompt set ("live" or "object") for a subject and its prompts, filled as the model was trained.

    `class_noun` is the subject's real class and picks the list; `instance_class_noun` is the noun the
    instance prompt used (differs in the class-noun ablation) and fills the prompts. CLIP-T's text always
    names the real class: the image must show a teapot in the jungle whatever noun the model was taught.
    """
    kind = "live" if class_noun in live_classes else "object"
    noun = class_noun if instance_class_noun is None else instance_class_noun
    templates = read_prompt_lists(prompts_file)[kind][:num_prompts]
    return kind, [
        EvalPrompt(i, t, fill_prompt(t, identifier, noun), fill_prompt(t, "", class_noun))
        for i, t in enumerate(templates)
    ]
