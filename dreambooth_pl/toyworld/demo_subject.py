"""A synthetic DreamBooth subject, so the default demo runs without the dataset.

The demo must work on a fresh checkout with no network, so when the DreamBooth
dataset is absent we draw our own subject with the toy world's renderer: a green
teapot with pink diamonds.  A single, fixed colour pattern is what makes it a
*subject* (one particular teapot) rather than the generic class "teapot"; the views
vary the things DreamBooth photos vary (framing, scale, tilt, facing, background).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_pl.toyworld import scenes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Bump when the drawing changes, so cached renders from an older look are redrawn.
RENDER_VERSION = 2
_MANIFEST = ".demo_subject.json"

# The subject's identity: one toy-world teapot with a pattern no toy-world pretraining image has.
DEMO_TEAPOT = scenes.Instance("teapot", "green", "pink", "diamonds", (0.6, 0.7, 0.5, 0.4))


def _image_name(index: int) -> str:
    return f"demo_{index:02d}.png"


def _render_view(size: int, seed: int, index: int) -> Image.Image:
    """One studio photo; each view has its own RNG so views do not depend on num_images."""
    return scenes.render(DEMO_TEAPOT, scenes.sample_view(np.random.default_rng([seed, index])), size)


def _atomic_write(path: Path, write) -> None:
    """Write via a unique temp file + os.replace so concurrent ranks never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache should read like any other file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def render_demo_subject(
    out_dir: str | os.PathLike,
    num_images: int = 5,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Render the demo teapot into ``out_dir`` once, reusing the files on later runs.

    A small manifest records the parameters, so a cache drawn with another size, seed,
    count or drawing version is redrawn instead of silently reused.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"version": RENDER_VERSION, "num_images": int(num_images), "size": int(size), "seed": int(seed)}
    paths = [out / _image_name(i) for i in range(num_images)]

    manifest = out / _MANIFEST
    try:
        cached = json.loads(manifest.read_text())
    except (OSError, ValueError):
        cached = None
    if cached == params and all(p.is_file() for p in paths):
        return out

    if cached != params:
        # Drop views left over from a larger num_images, so the folder holds exactly this subject.
        for old in out.glob("demo_*.png"):
            if old not in paths:
                old.unlink(missing_ok=True)

    for i, p in enumerate(paths):
        if cached == params and p.is_file():
            continue
        img = _render_view(size, seed, i)
        _atomic_write(p, lambda f, img=img: img.save(f, format="PNG"))
    _atomic_write(manifest, lambda f: f.write(json.dumps(params, sort_keys=True).encode()))
    log.info("Rendered %d demo subject images (%dpx, seed %d) into %s", num_images, size, seed, out)
    return out


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()
    )


def demo_instance_dir(
    dataset_dir: str | None,
    render_dir: str,
    num_images: int = 5,
    size: int = 256,
    seed: int = 0,
) -> str:
    """Prefer the real DreamBooth photos; fall back to a rendered teapot so the demo always runs."""
    if dataset_dir:
        ds = Path(os.path.expanduser(str(dataset_dir)))
        if _has_images(ds):
            log.info("Demo subject: using DreamBooth dataset images in %s", ds)
            return str(ds)
    log.info(
        "Demo subject: DreamBooth dataset folder %s not found or empty; using a rendered teapot in %s",
        dataset_dir,
        render_dir,
    )
    return str(render_demo_subject(os.path.expanduser(str(render_dir)), num_images=num_images, size=size, seed=seed))
