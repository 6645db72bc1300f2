"""The toy world's check of a training job, registered by conf/model/toy.yaml under `model.checks`."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def warn_toy_model_on_photos(pretrained: str, instance_dir: str, toyworld_dir: str, cache_dir: str) -> None:
    """The toy model knows only the toy world's cartoons: fine-tuned on photos from elsewhere it draws blobs,
    which reads as "DreamBooth does not work". Said before any work, with the command for a real model."""
    toyworld, cache = Path(toyworld_dir).resolve(), Path(cache_dir).resolve()
    photos = Path(instance_dir).resolve()
    if not Path(pretrained).resolve().is_relative_to(toyworld) or any(map(photos.is_relative_to, (toyworld, cache))):
        return
    log.warning(
        "model=toy knows only the toy world's cartoons (docs/toy_world.md), but the photos in %s are not from the "
        "toy world: expect blobs, not your subject. For real photos use a real model on a GPU: "
        "add `model=sd15 trainer=gpu` to this command (or model.pretrained=<a local diffusers folder>).",
        photos,
    )
