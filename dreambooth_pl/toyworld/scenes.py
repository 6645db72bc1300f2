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


# --------------------------------------------------------------------------- contexts


def _noise(rng, shape, amount):
    return rng.normal(0, amount, shape).astype(np.float32)


def _fill(bg: np.ndarray, y0: int, y1: int, top, bottom=None):
    bottom = top if bottom is None else bottom
    t = np.linspace(0, 1, max(1, y1 - y0), dtype=np.float32)[:, None, None]
    bg[y0:y1] = np.asarray(top, np.float32) + (np.asarray(bottom, np.float32) - np.asarray(top, np.float32)) * t


def _background(context: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """An s x s RGB float array and the ground line (fraction of height) objects stand on."""
    bg = np.zeros((s, s, 3), np.float32)
    img = None
    sky = np.array([120, 170, 230]) + rng.normal(0, 8, 3)
    horizon = int(s * rng.uniform(0.45, 0.6))
    ground = 0.9

    def draw():
        nonlocal img
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        return ImageDraw.Draw(img)

    if context == "":
        a = np.array(
            [[238, 230, 214], [214, 196, 170], [200, 200, 204], [246, 222, 206], [232, 214, 232], [250, 244, 236]]
        )[rng.integers(6)]
        if rng.integers(2):
            _fill(bg, 0, horizon, a, a * 0.92)
            _fill(bg, horizon, s, a * 0.8, a * 0.9)
        else:
            _fill(bg, 0, s, a, a * 0.85)
    elif context == "in the jungle":
        _fill(bg, 0, s, (30, 90, 40), (20, 60, 25))
        d = draw()
        for _ in range(40):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(4, 14) * s / 128
            g = (int(rng.uniform(30, 70)), int(rng.uniform(110, 180)), int(rng.uniform(30, 70)))
            d.ellipse((x - r, y - r * 0.5, x + r, y + r * 0.5), fill=g)
        for _ in range(5):
            x = rng.uniform(0, s)
            d.line((x, 0, x + rng.uniform(-10, 10), s), fill=(70, 50, 25), width=max(2, s // 40))
    elif context == "in the snow":
        _fill(bg, 0, horizon, (190, 200, 215), (220, 226, 235))
        _fill(bg, horizon, s, (245, 247, 250), (230, 234, 240))
        d = draw()
        for _ in range(50):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            d.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(255, 255, 255))
    elif context == "on the beach":
        sea = int(horizon * 0.75)
        _fill(bg, 0, sea, sky, sky + 30)
        _fill(bg, sea, horizon, (30, 110, 170), (60, 150, 190))
        _fill(bg, horizon, s, (230, 205, 150), (215, 185, 130))
    elif context == "on a cobblestone street":
        _fill(bg, 0, s, (120, 118, 114))
        d = draw()
        c = s // 10
        for j in range(-1, 11):
            for i in range(-1, 11):
                x, y = i * c + (j % 2) * c / 2, j * c
                v = int(rng.uniform(130, 175))
                d.rounded_rectangle((x + 1, y + 1, x + c - 1, y + c - 1), radius=c // 3, fill=(v, v - 4, v - 10))
    elif context == "on top of pink fabric":
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
        fold = 0.85 + 0.15 * np.sin((xs + ys * 0.6) / s * 12 + rng.uniform(0, 6))
        bg[:] = np.array([240, 150, 190], np.float32) * fold[..., None]
    elif context == "on top of a wooden floor":
        _fill(bg, 0, horizon, (225, 215, 195))
        _fill(bg, horizon, s, (150, 95, 50), (125, 75, 38))
        for y in range(horizon, s, max(3, s // 16)):
            bg[y] *= 0.7
    elif context == "with a city in the background":
        _fill(bg, 0, horizon, sky, sky + 25)
        _fill(bg, horizon, s, (110, 110, 115))
        d = draw()
        x = 0.0
        while x < s:
            w, h = rng.uniform(0.08, 0.16) * s, rng.uniform(0.15, 0.4) * s
            v = int(rng.uniform(60, 110))
            d.rectangle((x, horizon - h, x + w, horizon), fill=(v, v, v + 10))
            for wy in np.arange(horizon - h + 3, horizon - 3, 6 * s / 128):
                d.line((x + 2, wy, x + w - 2, wy), fill=(230, 220, 140), width=1)
            x += w + 1
    elif context == "with a mountain in the background":
        _fill(bg, 0, horizon, sky, sky + 25)
        _fill(bg, horizon, s, (90, 140, 70), (70, 120, 50))
        d = draw()
        for _ in range(2):
            px, ph = rng.uniform(0.2, 0.8) * s, rng.uniform(0.3, 0.45) * s
            d.polygon([(px - 0.45 * s, horizon), (px, horizon - ph), (px + 0.45 * s, horizon)], fill=(110, 105, 120))
            d.polygon(
                [(px - 0.1 * s, horizon - ph * 0.78), (px, horizon - ph), (px + 0.1 * s, horizon - ph * 0.78)],
                fill=(245, 245, 250),
            )
    elif context == "with a blue house in the background":
        _fill(bg, 0, horizon, sky, sky + 25)
        _fill(bg, horizon, s, (90, 160, 70), (70, 130, 55))
        d = draw()
        hx, hw, hh = rng.uniform(0.25, 0.75) * s, 0.42 * s, 0.22 * s
        d.rectangle((hx - hw / 2, horizon - hh, hx + hw / 2, horizon), fill=(50, 90, 200))
        d.polygon(
            [(hx - hw / 2 - 4, horizon - hh), (hx, horizon - hh - 0.16 * s), (hx + hw / 2 + 4, horizon - hh)],
            fill=(150, 50, 40),
        )
        d.rectangle((hx - 0.04 * s, horizon - 0.12 * s, hx + 0.04 * s, horizon), fill=(240, 240, 240))
    elif context == "on top of a purple rug in a forest":
        _fill(bg, 0, horizon, (40, 80, 45), (30, 60, 30))
        _fill(bg, horizon, s, (50, 90, 40))
        d = draw()
        for _ in range(6):
            tx = rng.uniform(0, s)
            d.polygon([(tx - 0.1 * s, horizon), (tx, horizon - 0.4 * s), (tx + 0.1 * s, horizon)], fill=(20, 70, 30))
        d.ellipse((0.05 * s, horizon + 0.05 * s, 0.95 * s, s * 1.05), fill=(120, 50, 150))
    elif context == "with a wheat field in the background":
        _fill(bg, 0, horizon, sky, sky + 25)
        _fill(bg, horizon, s, (220, 180, 70), (190, 150, 50))
        d = draw()
        for _ in range(60):
            x, y = rng.uniform(0, s), rng.uniform(horizon, s)
            d.line((x, y, x + rng.uniform(-2, 2), y - 0.06 * s), fill=(240, 205, 100), width=1)
    elif context == "with a tree and autumn leaves in the background":
        _fill(bg, 0, horizon, sky, sky + 25)
        _fill(bg, horizon, s, (150, 110, 60), (120, 90, 50))
        d = draw()
        tx = rng.uniform(0.15, 0.85) * s
        d.rectangle((tx - 0.04 * s, horizon - 0.3 * s, tx + 0.04 * s, horizon), fill=(90, 55, 30))
        for _ in range(30):
            x, y = tx + rng.normal(0, 0.15 * s), horizon - 0.35 * s + rng.normal(0, 0.1 * s)
            r = 0.05 * s
            d.ellipse(
                (x - r, y - r, x + r, y + r), fill=((230, 110, 20), (200, 50, 30), (240, 180, 40))[rng.integers(3)]
            )
        for _ in range(25):
            x, y = rng.uniform(0, s), rng.uniform(horizon, s)
            d.ellipse((x - 2, y - 1, x + 2, y + 1), fill=(220, 100, 30))
    elif context == "floating on top of water":
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
        wave = 0.85 + 0.15 * np.sin(ys / s * 40 + np.sin(xs / s * 8 + rng.uniform(0, 6)) * 2)
        bg[:] = np.array([40, 110, 180], np.float32) * wave[..., None]
        ground = 0.75
    elif context == "on top of green grass with sunflowers around it":
        _fill(bg, 0, s, (80, 160, 60), (50, 120, 40))
        d = draw()
        for _ in range(10):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), 0.06 * s
            d.ellipse((x - r, y - r, x + r, y + r), fill=(250, 200, 30))
            d.ellipse((x - r / 2.5, y - r / 2.5, x + r / 2.5, y + r / 2.5), fill=(90, 50, 20))
    elif context == "on top of a dirt road":
        _fill(bg, 0, horizon, (120, 150, 90))
        _fill(bg, horizon, s, (150, 110, 70), (130, 95, 60))
        d = draw()
        d.polygon([(0.42 * s, horizon), (0.58 * s, horizon), (s, s), (0, s)], fill=(165, 125, 85))
    elif context == "on top of a white rug":
        _fill(bg, 0, horizon, (200, 195, 185))
        _fill(bg, horizon, s, (245, 245, 240), (235, 235, 230))
    elif context == "kitchen counter":
        wall = np.array([(226, 232, 228), (240, 226, 200), (210, 222, 236)][rng.integers(3)], np.float32)
        _fill(bg, 0, horizon, wall)
        tile = max(4, s // 12)
        bg[:horizon:tile] *= 0.8
        bg[:horizon, ::tile] *= 0.8
        _fill(bg, horizon, s, (150, 150, 156), (120, 120, 126))
        d = draw()
        for _ in range(2):
            kx = rng.uniform(0.05, 0.95) * s
            d.rectangle((kx - 0.05 * s, horizon - 0.2 * s, kx + 0.05 * s, horizon), fill=(190, 190, 200))
    elif context == "bookshelf":
        _fill(bg, 0, s, (110, 76, 48), (96, 64, 40))
        d = draw()
        for top in (0.04 * s, horizon - 0.36 * s):
            x = 0.0
            while x < s:
                w, h = rng.uniform(0.03, 0.07) * s, rng.uniform(0.22, 0.32) * s
                spine = tuple(int(v) for v in rng.uniform(50, 220, 3))
                d.rectangle((x, top + 0.32 * s - h, x + w, top + 0.32 * s), fill=spine)
                x += w + 1
            d.rectangle((0, top + 0.32 * s, s, top + 0.35 * s), fill=(150, 108, 66))
        d.rectangle((0, horizon, s, s), fill=(150, 108, 66))
    elif context == "sofa":
        cloth = np.array([(120, 126, 110), (150, 140, 120), (90, 100, 120), (140, 90, 80)][rng.integers(4)])
        _fill(bg, 0, s, cloth * 0.8)
        d = draw()
        for k in range(3):
            x0 = (k / 3) * s + 2
            d.rounded_rectangle((x0, 0.12 * s, x0 + s / 3 - 4, horizon + 0.05 * s), radius=s // 10, fill=tuple(cloth))
        d.rounded_rectangle((-4, horizon, s + 4, s + 8), radius=s // 12, fill=tuple(int(v) for v in cloth * 1.1))
    elif context == "desk by a window":
        _fill(bg, 0, horizon, (220, 214, 200))
        d = draw()
        wx = rng.uniform(0.1, 0.5) * s
        d.rectangle(
            (wx, 0.08 * s, wx + 0.42 * s, horizon - 0.08 * s), fill=(150, 190, 230), outline=(250, 250, 250), width=3
        )
        d.line((wx + 0.21 * s, 0.08 * s, wx + 0.21 * s, horizon - 0.08 * s), fill=(250, 250, 250), width=3)
        d.rectangle((0, horizon, s, s), fill=(176, 140, 100))
        d.line((0, horizon, s, horizon), fill=(120, 90, 60), width=2)
    elif context == "tiled floor":
        _fill(bg, 0, horizon, (200, 200, 196))
        _fill(bg, horizon, s, (214, 206, 190), (190, 180, 164))
        for y in range(horizon, s, max(4, s // 10)):
            bg[y] *= 0.75
        for x in range(0, s, max(6, s // 6)):
            bg[horizon:, x] *= 0.75
    else:
        raise ValueError(f"unknown context {context!r}")
    if img is not None:
        bg = np.asarray(img).astype(np.float32)
    return bg + _noise(rng, bg.shape, 3.0), ground


def render(inst: Instance, view: View, size: int = 64) -> Image.Image:
    """One photo of `inst` taken as `view`, size x size RGB; drawn at 2x and downscaled for smooth edges."""
    rng = np.random.default_rng(view.seed)
    canvas = 2 * size
    bg, ground = _background(view.context, rng, canvas)
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
