"""The toy world's renderer: captioned scenes of simple objects in DreamBench-like contexts (PIL + numpy).

Every attribute a caption names (class, colour, context) is drawn from a known value, so what a model
generates can be scored against what it was asked for, and instances (shape + colours + pattern) can be
told apart, which is what DINO measures. Patterns in SUBJECT_PATTERNS are never used for pretraining
images, so a toy subject is an instance the base model has never seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dreambooth_pl.toyworld.backgrounds import background

CLASSES = ("teapot", "backpack", "vase", "can", "sneaker", "dog", "bowl", "candle")

# Named colours: a caption's colour word is the object's main colour (up to a little jitter).
COLOURS = {
    "red": (200, 36, 36),
    "orange": (236, 128, 24),
    "yellow": (240, 208, 40),
    "green": (40, 150, 60),
    "blue": (36, 80, 200),
    "purple": (128, 48, 160),
    "pink": (240, 130, 180),
    "white": (236, 236, 232),
    "black": (30, 30, 34),
    "brown": (120, 72, 36),
}

# "" is a plain studio background (no context words in the caption), like the subjects' own photos.
CONTEXTS = (
    "",
    "in the jungle",
    "in the snow",
    "on the beach",
    "on a cobblestone street",
    "on top of pink fabric",
    "on top of a wooden floor",
    "with a city in the background",
    "with a mountain in the background",
    "with a blue house in the background",
    "on top of a purple rug in a forest",
    "with a wheat field in the background",
    "with a tree and autumn leaves in the background",
    "floating on top of water",
    "on top of green grass with sunflowers around it",
    "on top of a dirt road",
    "on top of a white rug",
)

# Where the subjects' own photos are taken, as the DreamBooth dataset's are: everyday places no caption names
# and no evaluation prompt asks for, so a background is never the subject (pretraining never shows them).
PHOTO_SETTINGS = ("kitchen counter", "bookshelf", "sofa", "desk by a window", "tiled floor")

PRETRAIN_PATTERNS = ("plain", "stripes", "dots", "band")
SUBJECT_PATTERNS = ("checker", "zigzag", "diamonds", "diagonal")


def caption(cls: str, context: str = "", colour: str | None = None) -> str:
    """The DreamBench prompt style: "a red teapot on the beach"."""
    words = ["a", colour, cls, context]
    return " ".join(w for w in words if w)


def held_out_pairs() -> set[tuple[str, str]]:
    """(class, context) pairs no pretraining image shows: each class misses two contexts, each context
    is missed by at most one class, so prompts for them test composition, not recall."""
    contexts = CONTEXTS[1:]
    return {(cls, contexts[(2 * i + k) % len(contexts)]) for i, cls in enumerate(CLASSES) for k in (0, 1)}


@dataclass(frozen=True)
class Instance:
    """One particular object: what stays the same across its views."""

    cls: str
    colour: str
    second: str
    pattern: str
    shape: tuple[float, ...]  # class-specific proportions in [0, 1]
    jitter: tuple[int, int, int] = (0, 0, 0)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[self.colour], self.jitter))

    def recoloured(self, colour: str) -> Instance:
        """The same object in another main colour ("a red sks teapot")."""
        second = self.second if self.second != colour else next(c for c in COLOURS if c not in (colour, self.colour))
        return Instance(self.cls, colour, second, self.pattern, self.shape, self.jitter)


LOOKALIKES = ("pattern", "second colour", "proportions", "all three")


def lookalike(rng: np.random.Generator, inst: Instance, kind: str) -> Instance:
    """Same class and main colour; another pattern, second colour or proportions (or all three). Proportions
    move by 0.4-0.6 of their range each, so the look-alike is visibly another object, never a near-copy."""
    change = {"pattern", "second colour", "proportions"} if kind == "all three" else {kind}
    pattern, second, shape = inst.pattern, inst.second, inst.shape
    if "pattern" in change:
        pattern = str(rng.choice([p for p in SUBJECT_PATTERNS if p != inst.pattern]))
    if "second colour" in change:
        second = str(rng.choice([c for c in COLOURS if c not in (inst.colour, inst.second)]))
    if "proportions" in change:
        shape = tuple(float((v + rng.uniform(0.4, 0.6)) % 1) for v in inst.shape)
    return replace(inst, pattern=pattern, second=second, shape=shape)


@dataclass(frozen=True)
class View:
    """How one photo of an instance is taken."""

    context: str = ""
    flip: bool = False
    angle: float = 0.0
    scale: float = 0.55  # object height / image height
    x: float = 0.5  # horizontal centre, fraction of the width
    seed: int = 0  # background details
    crop: float = 1.0  # < 1: a close-up framing this fraction of the object's height, centred on it


def sample_instance(rng: np.random.Generator, cls: str | None = None, patterns=PRETRAIN_PATTERNS) -> Instance:
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    second = names[rng.integers(len(names))]
    while second == colour:
        second = names[rng.integers(len(names))]
    return Instance(
        cls=cls or CLASSES[rng.integers(len(CLASSES))],
        colour=colour,
        second=second,
        pattern=patterns[rng.integers(len(patterns))],
        shape=tuple(float(v) for v in rng.uniform(0, 1, 4)),
        jitter=tuple(int(v) for v in rng.integers(-14, 15, 3)),
    )


def sample_view(rng: np.random.Generator, context: str = "") -> View:
    return View(
        context=context,
        flip=bool(rng.integers(2)),
        angle=float(rng.uniform(-10, 10)),
        scale=float(rng.uniform(0.42, 0.62)),
        x=float(rng.uniform(0.38, 0.62)),
        seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------- objects

_S = 128  # sprites are drawn at this size, then posed and composited
_OUTLINE = (28, 28, 32, 255)


def _shade(rgb, factor: float) -> tuple[int, int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb) + (255,)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _teapot(d: ImageDraw.ImageDraw, body: ImageDraw.ImageDraw, inst: Instance, main, dark):
    w = _lerp(70, 96, inst.shape[0])
    h = _lerp(54, 70, inst.shape[1])
    cx, base = 64, 112
    box = (cx - w / 2, base - h, cx + w / 2, base)
    spout = _lerp(16, 30, inst.shape[2])
    d.ellipse((cx - w / 2 - 22, base - h * 0.8, cx - w / 2 + 14, base - h * 0.25), outline=_OUTLINE, width=9)
    d.ellipse((cx - w / 2 - 19, base - h * 0.77, cx - w / 2 + 11, base - h * 0.28), outline=main, width=4)
    tip = (cx + w / 2 + spout, base - h - 4)
    d.polygon(
        [(cx + w / 2 - 8, base - h * 0.55), tip, (tip[0] + 6, tip[1] + 4), (cx + w / 2 - 4, base - h * 0.2)],
        fill=main,
        outline=_OUTLINE,
        width=2,
    )
    for draw, fill in ((d, main), (body, 255)):
        draw.ellipse(box, fill=fill, outline=_OUTLINE if draw is d else None, width=3)
    lid = _lerp(0.45, 0.7, inst.shape[3]) * w / 2
    d.chord(
        (cx - lid, base - h - lid * 0.7, cx + lid, base - h + lid * 0.7), 180, 360, fill=dark, outline=_OUTLINE, width=2
    )
    d.ellipse(
        (cx - 6, base - h - lid * 0.7 - 9, cx + 6, base - h - lid * 0.7 + 2), fill=dark, outline=_OUTLINE, width=2
    )


def _backpack(d, body, inst, main, dark):
    w = _lerp(58, 80, inst.shape[0])
    h = _lerp(74, 96, inst.shape[1])
    cx, base = 64, 114
    d.arc((cx - 16, base - h - 18, cx + 16, base - h + 14), 180, 360, fill=_OUTLINE, width=6)
    box = (cx - w / 2, base - h, cx + w / 2, base)
    for draw, fill in ((d, main), (body, 255)):
        draw.rounded_rectangle(box, radius=int(w * 0.3), fill=fill, outline=_OUTLINE if draw is d else None, width=3)
    pw = _lerp(0.5, 0.8, inst.shape[2]) * w
    ph = _lerp(0.28, 0.42, inst.shape[3]) * h
    d.rounded_rectangle(
        (cx - pw / 2, base - ph - 6, cx + pw / 2, base - 6), radius=8, fill=dark, outline=_OUTLINE, width=2
    )
    d.line((cx - pw / 2 + 4, base - ph + 2, cx + pw / 2 - 4, base - ph + 2), fill=_OUTLINE, width=2)


def _vase(d, body, inst, main, dark):
    h = _lerp(80, 104, inst.shape[0])
    belly = _lerp(22, 40, inst.shape[1])
    neck = _lerp(8, 16, inst.shape[2])
    lip = neck + _lerp(2, 10, inst.shape[3])
    cx, base = 64, 114
    ys = np.linspace(0, 1, 24)
    radius = neck + (belly - neck) * np.sin(np.pi * np.clip((1 - ys) * 1.25, 0, 1)) ** 1.5
    radius[-3:] = np.linspace(radius[-4], lip, 3)
    right = [(cx + r, base - y * h) for r, y in zip(radius, ys)]
    left = [(cx - r, base - y * h) for r, y in zip(radius[::-1], ys[::-1])]
    for draw, fill in ((d, main), (body, 255)):
        draw.polygon(right + left, fill=fill, outline=_OUTLINE if draw is d else None, width=3)
    d.ellipse((cx - lip, base - h - 4, cx + lip, base - h + 4), fill=dark, outline=_OUTLINE, width=2)


def _can(d, body, inst, main, dark):
    w = _lerp(40, 62, inst.shape[0])
    h = _lerp(62, 96, inst.shape[1])
    cx, base = 64, 112
    e = w * 0.18
    for draw, fill in ((d, main), (body, 255)):
        draw.rectangle((cx - w / 2, base - h, cx + w / 2, base), fill=fill)
        draw.ellipse((cx - w / 2, base - e, cx + w / 2, base + e), fill=fill)
    d.line((cx - w / 2, base - h, cx - w / 2, base), fill=_OUTLINE, width=3)
    d.line((cx + w / 2, base - h, cx + w / 2, base), fill=_OUTLINE, width=3)
    d.arc((cx - w / 2, base - e, cx + w / 2, base + e), 0, 180, fill=_OUTLINE, width=3)
    d.ellipse(
        (cx - w / 2, base - h - e, cx + w / 2, base - h + e), fill=(190, 192, 198, 255), outline=_OUTLINE, width=3
    )
    d.ellipse((cx - 5, base - h - 3, cx + 7, base - h + 3), fill=(120, 122, 128, 255))


def _sneaker(d, body, inst, main, dark):
    length = _lerp(92, 112, inst.shape[0])
    top = _lerp(38, 62, inst.shape[1])  # high-tops reach higher
    x0, base = 64 - length / 2, 104
    upper = [
        (x0 + 2, base - 8),
        (x0 + 4, base - top),
        (x0 + length * 0.32, base - top),
        (x0 + length * 0.42, base - top * _lerp(0.45, 0.7, inst.shape[2])),
        (x0 + length * 0.9, base - 18),
        (x0 + length, base - 8),
    ]
    for draw, fill in ((d, main), (body, 255)):
        draw.polygon(upper, fill=fill, outline=_OUTLINE if draw is d else None, width=3)
    sole = (236, 236, 232, 255) if inst.colour != "white" else (60, 60, 64, 255)
    d.rounded_rectangle((x0, base - 9, x0 + length + 2, base + 4), radius=5, fill=sole, outline=_OUTLINE, width=2)
    for k in range(4):
        x = x0 + length * (0.36 + 0.09 * k)
        y = base - top * 0.55 + k * _lerp(3, 6, inst.shape[3]) * 1.5
        d.line((x - 5, y - 3, x + 5, y + 3), fill=dark, width=3)


def _dog(d, body, inst, main, dark):
    bw = _lerp(56, 74, inst.shape[0])
    leg = _lerp(18, 32, inst.shape[1])
    cx, base = 58, 114
    top = base - leg - 30
    for x in (cx - bw / 2 + 6, cx - bw / 2 + 16, cx + bw / 2 - 16, cx + bw / 2 - 6):
        d.rectangle((x - 4, top + 20, x + 4, base), fill=dark, outline=_OUTLINE, width=2)
    d.line((cx - bw / 2 + 2, top + 10, cx - bw / 2 - 12, top - 6), fill=_OUTLINE, width=6)
    d.line((cx - bw / 2 + 2, top + 10, cx - bw / 2 - 11, top - 5), fill=dark, width=3)
    for draw, fill in ((d, main), (body, 255)):
        draw.ellipse(
            (cx - bw / 2, top, cx + bw / 2, top + 32), fill=fill, outline=_OUTLINE if draw is d else None, width=3
        )
    head = _lerp(24, 32, inst.shape[2])
    hx, hy = cx + bw / 2 - 2, top - 10
    d.ellipse((hx - head / 2, hy - head / 2, hx + head / 2, hy + head / 2), fill=main, outline=_OUTLINE, width=3)
    d.ellipse((hx + head / 2 - 10, hy - 2, hx + head / 2 + 8, hy + 10), fill=main, outline=_OUTLINE, width=2)
    d.ellipse((hx + head / 2 + 3, hy, hx + head / 2 + 9, hy + 5), fill=_OUTLINE)
    ear = _lerp(10, 20, inst.shape[3])
    d.polygon(
        [(hx - 8, hy - head / 2 + 4), (hx - 2, hy - head / 2 + 4), (hx - 10, hy - head / 2 + 4 + ear)],
        fill=dark,
        outline=_OUTLINE,
        width=2,
    )
    d.ellipse((hx + 1, hy - 5, hx + 6, hy), fill=_OUTLINE)


def _bowl(d, body, inst, main, dark):
    w = _lerp(84, 112, inst.shape[0])
    h = _lerp(34, 52, inst.shape[1])
    cx, base = 64, 108
    box = (cx - w / 2, base - 2 * h, cx + w / 2, base)
    for draw, fill in ((d, main), (body, 255)):
        draw.chord(box, 0, 180, fill=fill, outline=_OUTLINE if draw is d else None, width=3)
    rim = _lerp(6, 12, inst.shape[2])
    d.ellipse((cx - w / 2, base - h - rim, cx + w / 2, base - h + rim), fill=dark, outline=_OUTLINE, width=3)
    fw = _lerp(0.25, 0.45, inst.shape[3]) * w
    d.rectangle((cx - fw / 2, base - 2, cx + fw / 2, base + 6), fill=dark, outline=_OUTLINE, width=2)


def _candle(d, body, inst, main, dark):
    w = _lerp(26, 44, inst.shape[0])
    h = _lerp(50, 80, inst.shape[1])
    cx, base = 64, 114
    for draw, fill in ((d, main), (body, 255)):
        draw.rectangle(
            (cx - w / 2, base - h, cx + w / 2, base), fill=fill, outline=_OUTLINE if draw is d else None, width=3
        )
    d.ellipse((cx - w / 2, base - h - 4, cx + w / 2, base - h + 4), fill=dark, outline=_OUTLINE, width=2)
    d.line((cx, base - h, cx, base - h - 8), fill=_OUTLINE, width=2)
    flame = _lerp(12, 22, inst.shape[2])
    d.ellipse((cx - 6, base - h - 8 - flame, cx + 6, base - h - 6), fill=(250, 170, 30, 255))
    d.ellipse((cx - 3, base - h - 6 - flame * 0.6, cx + 3, base - h - 7), fill=(255, 240, 150, 255))
    dw = _lerp(0.6, 1.6, inst.shape[3]) * w
    d.ellipse((cx - dw / 2, base - 4, cx + dw / 2, base + 6), fill=(200, 200, 206, 255), outline=_OUTLINE, width=2)


_DRAW = {
    "teapot": _teapot,
    "backpack": _backpack,
    "vase": _vase,
    "can": _can,
    "sneaker": _sneaker,
    "dog": _dog,
    "bowl": _bowl,
    "candle": _candle,
}


def _pattern_mask(pattern: str, seed_shape: tuple[float, ...]) -> np.ndarray:
    """Where the second colour goes, in sprite coordinates (True = second colour)."""
    ys, xs = np.mgrid[0:_S, 0:_S].astype(np.float32)
    period = 14 + 6 * seed_shape[3]
    if pattern == "plain":
        return np.zeros((_S, _S), bool)
    if pattern == "stripes":
        return (ys // (period / 2)) % 2 == 1
    if pattern == "band":
        return np.abs(ys - 74) < 7
    if pattern == "dots":
        return ((xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2) < (period * 0.28) ** 2
    # the subjects' patterns are coarse: a 128 px sprite becomes an object 27-40 px tall in a 64 px photo
    # (view.scale 0.42-0.62), so a sprite pixel is 0.21-0.31 photo pixels and checker cells are 10-15 px,
    # diamonds 6-9 px wide on a 10-15 px grid, zigzag and diagonal stripes 3-6 px wide; the toy VAE's latents
    # are 4 px apart, so a finer pattern would be lost before the UNet sees it
    if pattern == "checker":
        return ((xs // 48) + (ys // 48)) % 2 == 1
    if pattern == "zigzag":
        return np.abs((ys + 16 * np.abs((xs % 40) / 20 - 1)) % 44 - 22) < 8
    if pattern == "diamonds":
        return (np.abs(xs % 48 - 24) + np.abs(ys % 48 - 24)) < 14
    if pattern == "diagonal":
        return ((xs + ys) // 20) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def draw_object(inst: Instance) -> Image.Image:
    """The instance on transparency at sprite size, shaded as a lit solid."""
    img = Image.new("RGBA", (_S, _S), (0, 0, 0, 0))
    body = Image.new("L", (_S, _S), 0)
    main = inst.rgb + (255,)
    _DRAW[inst.cls](ImageDraw.Draw(img), ImageDraw.Draw(body), inst, main, _shade(inst.rgb, 0.7))
    arr = np.asarray(img).astype(np.float32)
    inside = (np.asarray(body.filter(ImageFilter.MinFilter(5))) > 0) & _pattern_mask(inst.pattern, inst.shape)
    arr[inside, :3] = COLOURS[inst.second]
    ys, xs = np.mgrid[0:_S, 0:_S].astype(np.float32)
    light = 1.12 - 0.35 * np.clip(((xs - 50) / 70) ** 2 + 0.4 * ((ys - 50) / 80) ** 2, 0, 1)
    arr[..., :3] = np.clip(arr[..., :3] * light[..., None], 0, 255)
    return Image.fromarray(arr.round().astype(np.uint8), "RGBA")


def render(inst: Instance, view: View, size: int = 64) -> Image.Image:
    """One photo of `inst` taken as `view`, size x size RGB; drawn at 2x and downscaled for smooth edges."""
    rng = np.random.default_rng(view.seed)
    canvas = 2 * size
    bg, ground = background(view.context, rng, canvas)
    out = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    sprite = draw_object(inst)
    if view.flip:
        sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sprite = sprite.rotate(view.angle, resample=Image.Resampling.BICUBIC, expand=True)
    sprite = sprite.crop(sprite.getbbox())
    scale = view.scale * canvas / max(sprite.size)
    sprite = sprite.resize(
        (max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale))), Image.Resampling.BILINEAR
    )
    x = int(np.clip(view.x * canvas - sprite.width / 2, 0, canvas - sprite.width))
    y = int(np.clip(ground * canvas - sprite.height, 0, canvas - sprite.height))
    shadow = Image.new("L", out.size, 0)
    ImageDraw.Draw(shadow).ellipse(
        (x + sprite.width * 0.1, y + sprite.height * 0.92, x + sprite.width * 0.9, y + sprite.height * 1.05), fill=100
    )
    out.paste(Image.new("RGB", out.size, (30, 30, 30)), (0, 0), shadow.filter(ImageFilter.GaussianBlur(3)))
    out.paste(sprite, (x, y), sprite)
    if view.crop < 1:
        half = view.crop * sprite.height / 2
        cx, cy = x + sprite.width / 2, y + sprite.height / 2
        out = out.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return out.resize((size, size), Image.Resampling.LANCZOS)
