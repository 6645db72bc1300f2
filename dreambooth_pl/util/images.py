"""Image files in and out with PIL and numpy only (no torchvision)."""

from __future__ import annotations

import logging
import math
import os
import random
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.files import atomic_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What PIL raises for a file it cannot decode; a decompression bomb (an image so large that decoding it
# could exhaust memory, such as a 20000x20000 PNG) is one, and `data.skip_unreadable` skips it like the rest.
UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)


class ImageFolderError(ConfigError):
    """A folder of training images is missing, empty or holds an unreadable file."""


def list_images(folder: str | os.PathLike, option: str = "subject.instance_dir") -> list[Path]:
    """Image files of a folder, sorted; other files are skipped with a note."""
    folder = Path(folder).expanduser()
    if folder.is_symlink() and not folder.exists():
        raise ImageFolderError(f"{option}={str(folder)!r} is a broken symbolic link or a link loop.")
    if not folder.is_dir():
        raise ImageFolderError(f"{option}={str(folder)!r}: folder does not exist.")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    dangling = [p.name for p in entries if p.is_symlink() and not p.exists()]
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p.name for p in files if p not in images]
    if skipped:
        log.info("%s: skipping non-image files %s", folder, ", ".join(skipped))
    if dangling and not images:
        raise ImageFolderError(
            f"{option}={str(folder)!r} holds no images, only broken symbolic links or link loops: "
            + ", ".join(dangling)
        )
    if dangling:
        log.warning("%s: skipping broken symbolic links or link loops %s", folder, ", ".join(dangling))
    if not images:
        raise ImageFolderError(f"{option}={str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return images


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any PIL-readable image as upright RGB, compositing transparency on white."""
    try:
        with Image.open(path) as image:
            image.load()
    except UNREADABLE as err:
        raise ImageFolderError(f"{path}: cannot read image ({err}).") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1.0
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * scale).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def save_atomically(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write to a temporary name and rename, so a reader never sees half a file."""
    path = Path(path)
    with atomic_file(path) as handle:
        image.save(handle, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def is_readable_image(path: str | os.PathLike) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except UNREADABLE:
        return False


def image_grid(images: list[Image.Image], cols: int | None = None, row_labels: list[str] | None = None) -> Image.Image:
    """Images in rows of `cols`; with `row_labels`, each row has its label (e.g. its prompt) written above it."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    chars_per_line = max(8, int(cols * width // max(1.0, font.getlength("x"))))
    labels = [textwrap.wrap(label, chars_per_line) or [""] for label in row_labels or []]
    bands = [line_height * len(lines) + 4 for lines in labels] or [0] * rows
    grid = Image.new("RGB", (cols * width, rows * height + sum(bands)), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for row in range(rows):
        for k, line in enumerate(labels[row] if labels else []):
            draw.text((2, top + 2 + k * line_height), line, fill="black", font=font)
        top += bands[row]
        for col, image in enumerate(images[row * cols : (row + 1) * cols]):
            grid.paste(image, (col * width, top))
        top += height
    return grid


class ImageView(NamedTuple):
    """One training view of an image, with the geometry SDXL-style micro-conditioning needs."""

    pixels: torch.Tensor
    name: str  # the crop box and flip, for the latent cache
    original_size: tuple[int, int]  # (height, width) of the image before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image as seen (mirrored if flipped)


class ImageTransform:
    """Resize the short side, crop to a square and scale to [-1, 1] as the VAE expects.

    `resize_filter` is a PIL filter name: bicubic (default: sharper when the DreamBooth dataset's photos are
    shrunk to 512 px) or bilinear (what the diffusers DreamBooth scripts use, to compare with them).
    """

    def __init__(
        self, resolution: int, center_crop: bool = True, random_flip: bool = False, resize_filter: str = "bicubic"
    ):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        try:
            self.resize_filter = Image.Resampling[resize_filter.upper()]
        except KeyError:
            names = ", ".join(f.name.lower() for f in Image.Resampling)
            raise ValueError(f"data.resize_filter={resize_filter!r}: use one of {names}.") from None

    @property
    def few_views(self) -> bool:
        """With a centre crop an image has at most two views (flipped or not): worth caching its latents."""
        return self.center_crop

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.view(image, rng)[0]

    def view(self, image: Image.Image, rng: random.Random | None = None) -> ImageView:
        """The tensor, a name for the view (crop box, flip) that produced it, and its geometry."""
        rng = rng or random
        original_size = (image.height, image.width)
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, self.resize_filter)
        if self.center_crop:
            left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
        else:
            left, top = rng.randint(0, size[0] - self.resolution), rng.randint(0, size[1] - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        seen_left = size[0] - self.resolution - left if flip else left
        return ImageView(pixels, f"{left},{top},{int(flip)}", original_size, (top, seen_left))
