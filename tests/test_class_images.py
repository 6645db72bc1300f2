"""Class images: cached by key, generated only when missing, never half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_pl.training.class_images import ClassImageCache

SAMPLER = {"num_inference_steps": 2, "resolution": 64, "batch_size": 3}


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def same_image(a, b) -> bool:
    """Equal up to float noise: a batch of 1 and a batch of 3 round differently in the last bit."""
    return np.abs(a - b).max() <= 2


def test_generates_only_what_is_missing(tmp_path, tiny_pretrained):
    cache = ClassImageCache(str(tmp_path), tiny_pretrained, SAMPLER, seed=7)
    assert cache.ensure("a teapot", 5) == 5
    paths = cache.paths("a teapot", 5)
    originals = [pixels(p) for p in paths]
    assert all(p.exists() for p in paths)
    assert not any(p.name.startswith(".") for p in paths[0].parent.iterdir() if p.suffix == ".png")

    assert cache.ensure("a teapot", 5) == 0  # second run: nothing to do

    paths[1].unlink()
    paths[3].unlink()
    assert cache.ensure("a teapot", 5) == 2  # exactly the two deleted ones
    for path, before in zip(paths, originals):
        assert same_image(pixels(path), before)  # image i always comes from seed + i

    paths[2].write_bytes(paths[2].read_bytes()[:100])  # truncated by a crash or a bad copy
    assert cache.ensure("a teapot", 5) == 1
    assert same_image(pixels(paths[2]), originals[2])

    manifest = json.loads((paths[0].parent / "manifest.json").read_text())
    assert manifest["key"]["prompt"] == "a teapot"
    assert manifest["images"] == [p.name for p in paths]


def test_more_images_reuse_the_first_ones(tmp_path, tiny_pretrained):
    cache = ClassImageCache(str(tmp_path), tiny_pretrained, SAMPLER)
    assert cache.ensure("a dog", 2) == 2
    assert cache.ensure("a dog", 4) == 2


def test_key_separates_prompts_and_settings(tmp_path, tiny_pretrained):
    base = ClassImageCache(str(tmp_path), tiny_pretrained, SAMPLER)
    other_steps = ClassImageCache(str(tmp_path), tiny_pretrained, {**SAMPLER, "num_inference_steps": 3})
    other_batch = ClassImageCache(str(tmp_path), tiny_pretrained, {**SAMPLER, "batch_size": 1})
    assert base.folder("a dog") != base.folder("a cat")
    assert base.folder("a dog") != other_steps.folder("a dog")
    assert base.folder("a dog") == other_batch.folder("a dog")  # batching changes pixels only by float noise


def test_key_follows_what_changes_pixels(tmp_path, tiny_pretrained):
    def folder(**options):
        return ClassImageCache(str(tmp_path), tiny_pretrained, SAMPLER, **options).folder("a dog")

    assert folder() == folder(dtype="float32", device="cpu")  # the CPU defaults, spelled out
    assert len({folder(), folder(dtype="bfloat16"), folder(variant="fp16"), folder(device="cuda")}) == 4


def test_new_weights_at_the_same_path_regenerate(tmp_path, tiny_pretrained):
    """Replacing a model's weights in place must not reuse the old model's class images."""
    model = tmp_path / "model"
    shutil.copytree(tiny_pretrained, model)
    cache = ClassImageCache(str(tmp_path / "cache"), str(model), SAMPLER)
    assert cache.ensure("a dog", 2) == 2
    old = [pixels(p) for p in cache.paths("a dog", 2)]
    unet_file = next((model / "unet").glob("*.safetensors"))
    save_file({k: v + 0.05 for k, v in load_file(unet_file).items()}, unet_file)  # "fine-tuned" in place
    assert cache.ensure("a dog", 2) == 2
    assert not same_image(pixels(cache.paths("a dog", 2)[0]), old[0])
