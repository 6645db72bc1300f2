"""The toy world's backgrounds: every context and photo setting paints the pixels it always did.

The shipped `toyworld/` data (pretraining set, subjects' photos, close-ups) was rendered by the renderer
as it was at commit d611995 ("moves"), before its 199-line if/elif became one painter per context; the
digests below were computed from that code (backgrounds at two canvas sizes and three seeds, and whole
renders of two classes, plain and close-up), so any change to a painter's pixels or random draws fails here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.backgrounds import PAINTERS, background
from dreambooth_pl.toyworld.subjects import subject_views, write_subjects
from tests.conftest import REPO

OLD_RENDERER_DIGESTS = {
    "": "d884979252d9c0cc",
    "in the jungle": "5e5c08fed61dd1f2",
    "in the snow": "83d3af47665197bd",
    "on the beach": "d059312d2f897b0f",
    "on a cobblestone street": "30f99048c3e1593f",
    "on top of pink fabric": "e8a99dd78d029bf0",
    "on top of a wooden floor": "2b6520dfe6281ca6",
    "with a city in the background": "a4258f9468cbce58",
    "with a mountain in the background": "528826ef3a3ce02d",
    "with a blue house in the background": "2105de250900b616",
    "on top of a purple rug in a forest": "7879605d3612f753",
    "with a wheat field in the background": "856d91d4a592af5b",
    "with a tree and autumn leaves in the background": "59ed27d2b635a716",
    "floating on top of water": "5939e1f6cba4d0d1",
    "on top of green grass with sunflowers around it": "a6b931647ffe402d",
    "on top of a dirt road": "4a2270536754d5d1",
    "on top of a white rug": "d8bcfce86a82c916",
    "kitchen counter": "019719f6e4bd0fbe",
    "bookshelf": "680f025c9840d198",
    "sofa": "a3f41363d7899355",
    "desk by a window": "8d825e3489fca449",
    "tiled floor": "4182aba1310c277a",
}


def _digest(context: str) -> str:
    digest = hashlib.sha256()
    for size in (128, 100):
        for seed in range(3):
            pixels, ground = background(context, np.random.default_rng(seed), size)
            digest.update(pixels.tobytes())
            digest.update(repr(ground).encode())
    rng = np.random.default_rng(7)
    for crop in (1.0, 0.5):
        view = scenes.View(context=context, flip=True, angle=4.0, seed=11, crop=crop)
        for cls in scenes.CLASSES[:2]:
            digest.update(scenes.render(scenes.sample_instance(rng, cls), view).tobytes())
    return digest.hexdigest()[:16]


def test_every_context_and_setting_has_one_painter():
    assert set(PAINTERS) == set(scenes.CONTEXTS) | set(scenes.PHOTO_SETTINGS) == set(OLD_RENDERER_DIGESTS)
    with pytest.raises(ValueError, match="unknown context 'on the moon'"):
        background("on the moon", np.random.default_rng(0), 64)


@pytest.mark.parametrize("context", sorted(OLD_RENDERER_DIGESTS))
def test_each_context_paints_what_the_old_renderer_painted(context):
    assert _digest(context) == OLD_RENDERER_DIGESTS[context]


def test_the_shipped_subject_photos_render_again_bit_for_bit(tmp_path):
    """The subjects stage, run again, writes every shipped photo unchanged (all five photo settings)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("toyworld")
    write_subjects(cfg.subjects, tmp_path / "dataset", cfg.data.size)
    shipped = sorted((REPO / "toyworld" / "dataset").glob("*/*.png"))
    assert len(shipped) == sum(s.views for s in cfg.subjects)
    settings = {view.context for s in cfg.subjects for view in subject_views(s)}
    assert settings == set(scenes.PHOTO_SETTINGS)
    for path in shipped:
        written = tmp_path / "dataset" / path.parent.name / path.name
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(written))), path
