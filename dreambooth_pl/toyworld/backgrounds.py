"""The toy world's backgrounds: one small painter per context and photo setting, looked up by its words.

A painter gets a `Canvas` (the float pixels, the random generator, a sky colour and a horizon drawn for
every background alike) and paints in place; `background` adds the sensor noise. The random draws happen
in a fixed order per context, so a context's pixels depend only on the seed (the shipped `toyworld/` data
was rendered this way; tests/test_toyworld_backgrounds.py pins them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class Canvas:
    """An s x s RGB float background being painted, and the ground line (fraction of height) objects stand on.

    Painters either work on `pixels` with numpy, or call `draw()` once, after their numpy fills, to continue
    with PIL shapes on an 8-bit copy."""

    rng: np.random.Generator
    s: int
    sky: np.ndarray
    horizon: int
    pixels: np.ndarray
    ground: float = 0.9
    image: Image.Image | None = None

    def fill(self, y0: int, y1: int, top, bottom=None) -> None:
        """Rows y0..y1 as a vertical gradient from `top` to `bottom` (one colour without it)."""
        bottom = top if bottom is None else bottom
        t = np.linspace(0, 1, max(1, y1 - y0), dtype=np.float32)[:, None, None]
        top = np.asarray(top, np.float32)
        self.pixels[y0:y1] = top + (np.asarray(bottom, np.float32) - top) * t

    def sky_over(self, land_top, land_bottom=None) -> None:
        """The shared sky down to the horizon, land below it."""
        self.fill(0, self.horizon, self.sky, self.sky + 25)
        self.fill(self.horizon, self.s, land_top, land_bottom)

    def draw(self) -> ImageDraw.ImageDraw:
        self.image = Image.fromarray(np.clip(self.pixels, 0, 255).astype(np.uint8))
        return ImageDraw.Draw(self.image)

    def painted(self) -> np.ndarray:
        return self.pixels if self.image is None else np.asarray(self.image).astype(np.float32)


PAINTERS: dict[str, Callable[[Canvas], None]] = {}


def _paints(context: str):
    def register(painter: Callable[[Canvas], None]) -> Callable[[Canvas], None]:
        PAINTERS[context] = painter
        return painter

    return register


def background(context: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """An s x s RGB float array of `context` (a caption's context words or a photo setting) and its ground line."""
    if context not in PAINTERS:
        raise ValueError(f"unknown context {context!r}")
    sky = np.array([120, 170, 230]) + rng.normal(0, 8, 3)
    horizon = int(s * rng.uniform(0.45, 0.6))
    canvas = Canvas(rng, s, sky, horizon, np.zeros((s, s, 3), np.float32))
    PAINTERS[context](canvas)
    pixels = canvas.painted()
    return pixels + rng.normal(0, 3.0, pixels.shape).astype(np.float32), canvas.ground


# --------------------------------------------------------------------------- caption contexts


@_paints("")
def _studio(c: Canvas) -> None:
    """A plain studio backdrop, like the subjects' own photos."""
    a = np.array(
        [[238, 230, 214], [214, 196, 170], [200, 200, 204], [246, 222, 206], [232, 214, 232], [250, 244, 236]]
    )[c.rng.integers(6)]
    if c.rng.integers(2):
        c.fill(0, c.horizon, a, a * 0.92)
        c.fill(c.horizon, c.s, a * 0.8, a * 0.9)
    else:
        c.fill(0, c.s, a, a * 0.85)


@_paints("in the jungle")
def _jungle(c: Canvas) -> None:
    rng, s = c.rng, c.s
    c.fill(0, s, (30, 90, 40), (20, 60, 25))
    d = c.draw()
    for _ in range(40):
        x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(4, 14) * s / 128
        g = (int(rng.uniform(30, 70)), int(rng.uniform(110, 180)), int(rng.uniform(30, 70)))
        d.ellipse((x - r, y - r * 0.5, x + r, y + r * 0.5), fill=g)
    for _ in range(5):
        x = rng.uniform(0, s)
        d.line((x, 0, x + rng.uniform(-10, 10), s), fill=(70, 50, 25), width=max(2, s // 40))


@_paints("in the snow")
def _snow(c: Canvas) -> None:
    c.fill(0, c.horizon, (190, 200, 215), (220, 226, 235))
    c.fill(c.horizon, c.s, (245, 247, 250), (230, 234, 240))
    d = c.draw()
    for _ in range(50):
        x, y = c.rng.uniform(0, c.s), c.rng.uniform(0, c.s)
        d.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(255, 255, 255))


@_paints("on the beach")
def _beach(c: Canvas) -> None:
    sea = int(c.horizon * 0.75)
    c.fill(0, sea, c.sky, c.sky + 30)
    c.fill(sea, c.horizon, (30, 110, 170), (60, 150, 190))
    c.fill(c.horizon, c.s, (230, 205, 150), (215, 185, 130))


@_paints("on a cobblestone street")
def _cobblestones(c: Canvas) -> None:
    c.fill(0, c.s, (120, 118, 114))
    d = c.draw()
    size = c.s // 10
    for j in range(-1, 11):
        for i in range(-1, 11):
            x, y = i * size + (j % 2) * size / 2, j * size
            v = int(c.rng.uniform(130, 175))
            d.rounded_rectangle((x + 1, y + 1, x + size - 1, y + size - 1), radius=size // 3, fill=(v, v - 4, v - 10))


@_paints("on top of pink fabric")
def _pink_fabric(c: Canvas) -> None:
    ys, xs = np.mgrid[0 : c.s, 0 : c.s].astype(np.float32)
    fold = 0.85 + 0.15 * np.sin((xs + ys * 0.6) / c.s * 12 + c.rng.uniform(0, 6))
    c.pixels[:] = np.array([240, 150, 190], np.float32) * fold[..., None]


@_paints("floating on top of water")
def _water(c: Canvas) -> None:
    ys, xs = np.mgrid[0 : c.s, 0 : c.s].astype(np.float32)
    wave = 0.85 + 0.15 * np.sin(ys / c.s * 40 + np.sin(xs / c.s * 8 + c.rng.uniform(0, 6)) * 2)
    c.pixels[:] = np.array([40, 110, 180], np.float32) * wave[..., None]
    c.ground = 0.75


@_paints("on top of a wooden floor")
def _wooden_floor(c: Canvas) -> None:
    c.fill(0, c.horizon, (225, 215, 195))
    c.fill(c.horizon, c.s, (150, 95, 50), (125, 75, 38))
    for y in range(c.horizon, c.s, max(3, c.s // 16)):
        c.pixels[y] *= 0.7


@_paints("with a city in the background")
def _city(c: Canvas) -> None:
    rng, s, horizon = c.rng, c.s, c.horizon
    c.sky_over((110, 110, 115))
    d = c.draw()
    x = 0.0
    while x < s:
        w, h = rng.uniform(0.08, 0.16) * s, rng.uniform(0.15, 0.4) * s
        v = int(rng.uniform(60, 110))
        d.rectangle((x, horizon - h, x + w, horizon), fill=(v, v, v + 10))
        for wy in np.arange(horizon - h + 3, horizon - 3, 6 * s / 128):
            d.line((x + 2, wy, x + w - 2, wy), fill=(230, 220, 140), width=1)
        x += w + 1


@_paints("with a mountain in the background")
def _mountain(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.sky_over((90, 140, 70), (70, 120, 50))
    d = c.draw()
    for _ in range(2):
        px, ph = c.rng.uniform(0.2, 0.8) * s, c.rng.uniform(0.3, 0.45) * s
        d.polygon([(px - 0.45 * s, horizon), (px, horizon - ph), (px + 0.45 * s, horizon)], fill=(110, 105, 120))
        snow_line = horizon - ph * 0.78
        d.polygon([(px - 0.1 * s, snow_line), (px, horizon - ph), (px + 0.1 * s, snow_line)], fill=(245, 245, 250))


@_paints("with a blue house in the background")
def _blue_house(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.sky_over((90, 160, 70), (70, 130, 55))
    d = c.draw()
    hx, hw, hh = c.rng.uniform(0.25, 0.75) * s, 0.42 * s, 0.22 * s
    d.rectangle((hx - hw / 2, horizon - hh, hx + hw / 2, horizon), fill=(50, 90, 200))
    roof = [(hx - hw / 2 - 4, horizon - hh), (hx, horizon - hh - 0.16 * s), (hx + hw / 2 + 4, horizon - hh)]
    d.polygon(roof, fill=(150, 50, 40))
    d.rectangle((hx - 0.04 * s, horizon - 0.12 * s, hx + 0.04 * s, horizon), fill=(240, 240, 240))


@_paints("on top of a purple rug in a forest")
def _rug_in_forest(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.fill(0, horizon, (40, 80, 45), (30, 60, 30))
    c.fill(horizon, s, (50, 90, 40))
    d = c.draw()
    for _ in range(6):
        tx = c.rng.uniform(0, s)
        d.polygon([(tx - 0.1 * s, horizon), (tx, horizon - 0.4 * s), (tx + 0.1 * s, horizon)], fill=(20, 70, 30))
    d.ellipse((0.05 * s, horizon + 0.05 * s, 0.95 * s, s * 1.05), fill=(120, 50, 150))


@_paints("with a wheat field in the background")
def _wheat_field(c: Canvas) -> None:
    c.sky_over((220, 180, 70), (190, 150, 50))
    d = c.draw()
    for _ in range(60):
        x, y = c.rng.uniform(0, c.s), c.rng.uniform(c.horizon, c.s)
        d.line((x, y, x + c.rng.uniform(-2, 2), y - 0.06 * c.s), fill=(240, 205, 100), width=1)


@_paints("with a tree and autumn leaves in the background")
def _autumn_tree(c: Canvas) -> None:
    rng, s, horizon = c.rng, c.s, c.horizon
    c.sky_over((150, 110, 60), (120, 90, 50))
    d = c.draw()
    tx = rng.uniform(0.15, 0.85) * s
    d.rectangle((tx - 0.04 * s, horizon - 0.3 * s, tx + 0.04 * s, horizon), fill=(90, 55, 30))
    r = 0.05 * s
    for _ in range(30):
        x, y = tx + rng.normal(0, 0.15 * s), horizon - 0.35 * s + rng.normal(0, 0.1 * s)
        d.ellipse((x - r, y - r, x + r, y + r), fill=((230, 110, 20), (200, 50, 30), (240, 180, 40))[rng.integers(3)])
    for _ in range(25):
        x, y = rng.uniform(0, s), rng.uniform(horizon, s)
        d.ellipse((x - 2, y - 1, x + 2, y + 1), fill=(220, 100, 30))


@_paints("on top of green grass with sunflowers around it")
def _sunflowers(c: Canvas) -> None:
    c.fill(0, c.s, (80, 160, 60), (50, 120, 40))
    d = c.draw()
    r = 0.06 * c.s
    for _ in range(10):
        x, y = c.rng.uniform(0, c.s), c.rng.uniform(0, c.s)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(250, 200, 30))
        d.ellipse((x - r / 2.5, y - r / 2.5, x + r / 2.5, y + r / 2.5), fill=(90, 50, 20))


@_paints("on top of a dirt road")
def _dirt_road(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.fill(0, horizon, (120, 150, 90))
    c.fill(horizon, s, (150, 110, 70), (130, 95, 60))
    c.draw().polygon([(0.42 * s, horizon), (0.58 * s, horizon), (s, s), (0, s)], fill=(165, 125, 85))


@_paints("on top of a white rug")
def _white_rug(c: Canvas) -> None:
    c.fill(0, c.horizon, (200, 195, 185))
    c.fill(c.horizon, c.s, (245, 245, 240), (235, 235, 230))


# --------------------------------------------------------------------------- photo settings (scenes.PHOTO_SETTINGS)


@_paints("kitchen counter")
def _kitchen_counter(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    wall = np.array([(226, 232, 228), (240, 226, 200), (210, 222, 236)][c.rng.integers(3)], np.float32)
    c.fill(0, horizon, wall)
    tile = max(4, s // 12)
    c.pixels[:horizon:tile] *= 0.8
    c.pixels[:horizon, ::tile] *= 0.8
    c.fill(horizon, s, (150, 150, 156), (120, 120, 126))
    d = c.draw()
    for _ in range(2):
        kx = c.rng.uniform(0.05, 0.95) * s
        d.rectangle((kx - 0.05 * s, horizon - 0.2 * s, kx + 0.05 * s, horizon), fill=(190, 190, 200))


@_paints("bookshelf")
def _bookshelf(c: Canvas) -> None:
    rng, s = c.rng, c.s
    c.fill(0, s, (110, 76, 48), (96, 64, 40))
    d = c.draw()
    for top in (0.04 * s, c.horizon - 0.36 * s):
        x = 0.0
        while x < s:
            w, h = rng.uniform(0.03, 0.07) * s, rng.uniform(0.22, 0.32) * s
            spine = tuple(int(v) for v in rng.uniform(50, 220, 3))
            d.rectangle((x, top + 0.32 * s - h, x + w, top + 0.32 * s), fill=spine)
            x += w + 1
        d.rectangle((0, top + 0.32 * s, s, top + 0.35 * s), fill=(150, 108, 66))
    d.rectangle((0, c.horizon, s, s), fill=(150, 108, 66))


@_paints("sofa")
def _sofa(c: Canvas) -> None:
    s = c.s
    cloth = np.array([(120, 126, 110), (150, 140, 120), (90, 100, 120), (140, 90, 80)][c.rng.integers(4)])
    c.fill(0, s, cloth * 0.8)
    d = c.draw()
    for k in range(3):
        x0 = (k / 3) * s + 2
        d.rounded_rectangle((x0, 0.12 * s, x0 + s / 3 - 4, c.horizon + 0.05 * s), radius=s // 10, fill=tuple(cloth))
    d.rounded_rectangle((-4, c.horizon, s + 4, s + 8), radius=s // 12, fill=tuple(int(v) for v in cloth * 1.1))


@_paints("desk by a window")
def _desk_by_window(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.fill(0, horizon, (220, 214, 200))
    d = c.draw()
    wx = c.rng.uniform(0.1, 0.5) * s
    white = (250, 250, 250)
    d.rectangle((wx, 0.08 * s, wx + 0.42 * s, horizon - 0.08 * s), fill=(150, 190, 230), outline=white, width=3)
    d.line((wx + 0.21 * s, 0.08 * s, wx + 0.21 * s, horizon - 0.08 * s), fill=white, width=3)
    d.rectangle((0, horizon, s, s), fill=(176, 140, 100))
    d.line((0, horizon, s, horizon), fill=(120, 90, 60), width=2)


@_paints("tiled floor")
def _tiled_floor(c: Canvas) -> None:
    s, horizon = c.s, c.horizon
    c.fill(0, horizon, (200, 200, 196))
    c.fill(horizon, s, (214, 206, 190), (190, 180, 164))
    for y in range(horizon, s, max(4, s // 10)):
        c.pixels[y] *= 0.75
    for x in range(0, s, max(6, s // 6)):
        c.pixels[horizon:, x] *= 0.75
