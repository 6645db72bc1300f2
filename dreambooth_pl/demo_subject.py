"""A synthetic DreamBooth subject, so the default demo runs without the dataset.

The demo must work on a fresh checkout with no network, so when the DreamBooth
dataset is absent we draw our own subject: a teal teapot with a yellow band and
coral dots.  A single, fixed colour pattern is what makes it a *subject* (one
particular teapot) rather than the generic class "teapot"; the views vary the
things DreamBooth photos vary (framing, scale, tilt, facing, background).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Bump when the drawing changes, so cached renders from an older look are redrawn.
RENDER_VERSION = 1
_MANIFEST = ".demo_subject.json"

# The subject's identity: these colours never vary between views.
_TEAL = (18, 128, 128)
_TEAL_DARK = (10, 86, 88)
_YELLOW = (244, 196, 48)
_CORAL = (236, 88, 82)
_OUTLINE = (22, 44, 48)

_SPRITE = 512  # the teapot is drawn once at this resolution, then transformed


def _image_name(index: int) -> str:
    return f"demo_{index:02d}.png"


def _teapot_sprite() -> Image.Image:
    """Draw the teapot once, large, on transparency; views are transforms of it."""
    s = _SPRITE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    ow = 5  # outline width: a dark contour keeps the silhouette readable when small

    # Handle (drawn first so the body covers its inner end): a thick ring on the left.
    d.ellipse((52, 222, 172, 372), outline=_OUTLINE, width=34)
    d.ellipse((57, 227, 167, 367), outline=_TEAL, width=24)

    # Spout: a tapering tube rising to the right.
    spout = [
        (372, 292),
        (420, 282),
        (452, 246),
        (476, 204),
        (500, 192),
        (504, 204),
        (486, 226),
        (462, 288),
        (430, 344),
        (380, 372),
    ]
    d.polygon(spout, fill=_TEAL, outline=_OUTLINE, width=ow)
    d.ellipse((486, 186, 510, 206), fill=_TEAL_DARK, outline=_OUTLINE, width=3)

    # Foot.
    d.rounded_rectangle((176, 394, 336, 426), radius=10, fill=_TEAL_DARK, outline=_OUTLINE, width=ow)

    # Body.
    body_box = (106, 190, 406, 416)
    d.ellipse(body_box, fill=_TEAL, outline=_OUTLINE, width=ow)

    # Yellow band with coral dots, clipped to the body.
    band = Image.new("L", (s, s), 0)
    ImageDraw.Draw(band).rectangle((0, 282, s, 322), fill=255)
    inner = Image.new("L", (s, s), 0)
    ImageDraw.Draw(inner).ellipse((body_box[0] + ow, body_box[1] + ow, body_box[2] - ow, body_box[3] - ow), fill=255)
    band_mask = Image.fromarray(np.minimum(np.asarray(band), np.asarray(inner)))
    img.paste(Image.new("RGBA", (s, s), _YELLOW + (255,)), (0, 0), band_mask)
    d = ImageDraw.Draw(img)
    for cx in range(136, 400, 34):
        d.ellipse((cx - 9, 293, cx + 9, 311), fill=_CORAL)
    # A second, sparser row of dots on the belly, so the pattern is not just a stripe.
    for cx in range(170, 360, 46):
        d.ellipse((cx - 7, 350, cx + 7, 364), fill=_YELLOW)

    # Lid, lid rim and knob.
    d.chord((166, 150, 346, 246), 180, 360, fill=_TEAL_DARK, outline=_OUTLINE, width=ow)
    d.rounded_rectangle((156, 192, 356, 208), radius=8, fill=_YELLOW, outline=_OUTLINE, width=4)
    d.ellipse((236, 122, 276, 160), fill=_YELLOW, outline=_OUTLINE, width=ow)

    # Cylindrical shading (light from the upper left) so it reads as a solid object.
    arr = np.asarray(img).astype(np.float32)
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
    u = (xs - 220.0) / 230.0
    v = (ys - 230.0) / 260.0
    shade = 1.12 - 0.42 * np.clip(u * u + 0.5 * v * v, 0.0, 1.0)
    arr[..., :3] = np.clip(arr[..., :3] * shade[..., None], 0, 255)
    # Specular highlight on the body.
    hl = np.exp(-(((xs - 185.0) / 26.0) ** 2 + ((ys - 250.0) / 16.0) ** 2))
    hl *= arr[..., 3] / 255.0
    arr[..., :3] = arr[..., :3] + (255.0 - arr[..., :3]) * (0.7 * hl[..., None])
    return Image.fromarray(arr.round().astype(np.uint8), "RGBA")


def _background(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """Plain, gradient or wall-and-table backgrounds, in colours that keep the teal pot visible."""

    def colour() -> np.ndarray:
        # Warm / neutral tones: far from the teal of the subject.
        hue_bank = np.array(
            [
                [238, 230, 214],
                [214, 196, 170],
                [200, 200, 204],
                [246, 222, 206],
                [176, 150, 126],
                [232, 214, 232],
                [120, 108, 104],
                [250, 244, 236],
            ],
            dtype=np.float32,
        )
        base = hue_bank[rng.integers(len(hue_bank))]
        return np.clip(base + rng.normal(0, 10, 3), 0, 255)

    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    a, b = colour(), colour()
    if kind == 0:  # plain
        bg = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == 1:  # vertical gradient
        bg = a + (b - a) * t[:, None, None]
        bg = np.broadcast_to(bg, (size, size, 3)).copy()
    elif kind == 2:  # diagonal gradient
        g = (t[:, None] + t[None, :]) / 2.0
        bg = a + (b - a) * g[..., None]
    else:  # wall above a table edge
        horizon = int(size * rng.uniform(0.55, 0.72))
        bg = np.empty((size, size, 3), dtype=np.float32)
        bg[:horizon] = a
        table = b * 0.8
        bg[horizon:] = table + (b - table) * t[: size - horizon, None, None]
    bg = bg + rng.normal(0, 3.0, bg.shape)  # faint sensor-like noise
    return np.clip(bg, 0, 255).astype(np.float32)


def _render_view(sprite: Image.Image, size: int, seed: int, index: int) -> Image.Image:
    """One photo-like view; each view has its own RNG so views do not depend on num_images."""
    rng = np.random.default_rng([seed, index])
    ss = 2  # supersample, then downscale, for smooth edges
    canvas = size * ss

    pot = sprite
    if index % 2 == 1:
        pot = pot.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-14.0, 14.0))
    pot = pot.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    pot = pot.crop(pot.getbbox())
    scale = float(rng.uniform(0.5, 0.85)) * canvas / max(pot.size)
    pot = pot.resize(
        (max(1, round(pot.width * scale)), max(1, round(pot.height * scale))),
        Image.Resampling.LANCZOS,
    )

    margin = int(0.03 * canvas)
    x = int(rng.integers(margin, max(margin + 1, canvas - pot.width - margin + 1)))
    y = int(rng.integers(margin, max(margin + 1, canvas - pot.height - margin + 1)))

    bg = _background(rng, int(rng.integers(4)) if index >= 4 else index, canvas)
    out = Image.fromarray(bg.round().astype(np.uint8), "RGB")

    # Soft contact shadow under the pot.
    shadow = Image.new("L", (canvas, canvas), 0)
    sy = y + pot.height
    ImageDraw.Draw(shadow).ellipse(
        (x + pot.width * 0.12, sy - pot.height * 0.06, x + pot.width * 0.88, sy + pot.height * 0.05),
        fill=110,
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(canvas / 60))
    out.paste(Image.new("RGB", out.size, (30, 30, 30)), (0, 0), shadow)

    out.paste(pot, (x, y), pot)
    return out.resize((size, size), Image.Resampling.LANCZOS)


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

    sprite = _teapot_sprite()
    for i, p in enumerate(paths):
        if cached == params and p.is_file():
            continue
        img = _render_view(sprite, size, seed, i)
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
