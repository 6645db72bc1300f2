"""Writing a run's products: whole folders appear at once, with the run's info beside the weights."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusers import StableDiffusionPipeline

from dreambooth_pl.runs.layout import EXPORT_INFO
from dreambooth_pl.util.files import DiskFull, disk_use, umask_mode

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"  # method.export_kohya: the SDXL scripts' name
TEXTUAL_INVERSION_WEIGHTS = "learned_embeds.safetensors"
# name parts of the hidden siblings `write_dir_atomically` makes: `.<target>-staging-*`, `.<target>-previous-*`
STAGING, PREVIOUS = "staging", "previous"


def write_dir_atomically(
    target: str | os.PathLike, write: Callable[[Path], None], export_info: dict | None = None
) -> Path:
    """Fill a sibling staging folder, then swap it in: at every instant `target` is the whole old folder
    or the whole new one, never half of either.

    The old folder is renamed aside before the new one is renamed in, and deleted only after; a kill
    between the two renames leaves it whole under its aside name, and the next write puts it back (then
    clears staging folders that killed writes left behind).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-{STAGING}-", dir=target.parent))
    try:
        try:
            write(staging)
        except OSError as err:
            if err.errno == errno.ENOSPC and not isinstance(err, DiskFull):
                raise DiskFull(target, disk_use(staging)) from None
            raise
        if export_info is not None:
            (staging / EXPORT_INFO).write_text(json.dumps(export_info, indent=2))
        umask_mode(staging)
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-{PREVIOUS}-", dir=target.parent))
            os.replace(target, aside)  # replaces the empty placeholder mkdtemp made
            os.replace(staging, target)
            shutil.rmtree(aside)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def recover_exports(folder: str | os.PathLike) -> None:
    """`recover_leftovers` for every export in a run folder, at the start of a run: a killed re-export must
    not leave the run without its model, nor a staging folder the size of a model, until the next export."""
    pattern = re.compile(rf"^\.(.+)-(?:{STAGING}|{PREVIOUS})-[^-]+$")
    names = {match.group(1) for path in Path(folder).glob(".*") if (match := pattern.match(path.name))}
    for name in sorted(names):
        recover_leftovers(Path(folder) / name)


def recover_leftovers(target: str | os.PathLike) -> None:
    """Undo what a killed `write_dir_atomically` left: restore an old folder that was renamed aside
    and never replaced, delete staging folders (each the size of a whole model) and finished asides."""
    target = Path(target)
    leftovers = sorted(target.parent.glob(f".{target.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in leftovers:
        if not path.is_dir():
            continue
        if path.name.startswith(f".{target.name}-{PREVIOUS}-") and not target.exists() and any(path.iterdir()):
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def save_pipeline_atomically(
    pipe: StableDiffusionPipeline, target: str | os.PathLike, export_info: dict | None = None
) -> Path:
    return write_dir_atomically(
        target, lambda staging: pipe.save_pretrained(staging, safe_serialization=True), export_info
    )


def read_export_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / EXPORT_INFO
    return json.loads(path.read_text()) if path.exists() else {}
