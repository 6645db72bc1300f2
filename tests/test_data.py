"""Image loading and preprocessing with PIL and numpy, on real dataset images and odd files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_pl.training.data import DreamBoothDataModule
from dreambooth_pl.util.images import ImageFolderError, ImageTransform, list_images, load_rgb
from tests.conftest import DREAMBOOTH_ROOT, needs_dataset


@needs_dataset
@pytest.mark.parametrize("resize_filter", ["bicubic", "bilinear"])  # ours, the diffusers scripts'
def test_transform_matches_a_plain_pil_reference(resize_filter):
    path = DREAMBOOTH_ROOT / "dataset" / "dog" / "00.jpg"
    image = load_rgb(path)
    image = image.resize((image.width // 8, image.height // 8))  # downscaled for speed
    tensor = ImageTransform(64, resize_filter=resize_filter)(image)

    scale = 64 / min(image.size)
    w, h = round(image.width * scale), round(image.height * scale)
    ref = image.resize((w, h), Image.Resampling[resize_filter.upper()])
    left, top = (w - 64) // 2, (h - 64) // 2
    ref = np.asarray(ref.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
    assert tensor.shape == (3, 64, 64)
    assert torch.allclose(tensor, torch.from_numpy(ref).permute(2, 0, 1))
    assert -1 <= tensor.min() and tensor.max() <= 1


def test_unknown_resize_filter_names_the_option():
    with pytest.raises(ValueError, match="data.resize_filter='bilinar'.*bilinear"):
        ImageTransform(64, resize_filter="bilinar")


def test_each_item_draws_its_instance_template_from_its_seed(tmp_path):
    """Textual Inversion's templates: a fixed draw per (item, seed), so a resumed run sees the same prompts."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    templates = [f"a photo {i} of a sks" for i in range(8)]
    dm = DreamBoothDataModule(str(tmp_path), templates, 64)
    dm.setup()
    drawn = [dm.dataset[(0, seed)]["instance_prompt"] for seed in range(40)]
    assert set(drawn) == set(templates)
    assert drawn == [dm.dataset[(0, seed)]["instance_prompt"] for seed in range(40)]


def test_random_flip_and_crop_change_pixels_but_not_shape():
    image = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    outputs = {transform(image).sum().item() for _ in range(20)}
    assert len(outputs) > 1
    assert transform(image).shape == (3, 32, 32)


def test_modes_become_upright_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert out[0, 0].tolist() == [0, 0, 255]

    Image.new("I;16", (4, 4), 65535).save(tmp_path / "b.png")
    assert np.asarray(load_rgb(tmp_path / "b.png"))[0, 0].tolist() == [255, 255, 255]

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert load_rgb(tmp_path / "c.jpg").mode == "RGB"

    tall = Image.new("RGB", (2, 6), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    tall.save(tmp_path / "d.jpg", exif=exif)
    assert load_rgb(tmp_path / "d.jpg").size == (6, 2)


def test_folder_errors_name_the_folder(tmp_path, caplog):
    with pytest.raises(ImageFolderError, match="subject.instance_dir=.*missing.*does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ImageFolderError, match="holds no images"):
        list_images(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with caplog.at_level(logging.INFO):
        assert [p.name for p in list_images(tmp_path)] == ["x.png"]
    assert "notes.txt" in caplog.text
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageFolderError, match="broken.jpg: cannot read image"):
        DreamBoothDataModule(str(tmp_path), "a sks dog", 8)  # at construction, before any model


def test_own_class_images_replace_generation(tmp_path, caplog):
    instance, classes = tmp_path / "inst", tmp_path / "cls"
    instance.mkdir()
    classes.mkdir()
    Image.new("RGB", (16, 16), "red").save(instance / "0.png")
    for i in range(3):
        Image.new("RGB", (16, 16), "blue").save(classes / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        dm = DreamBoothDataModule(
            str(instance), "a sks dog", 8, class_prompt="a dog", num_class_images=2, class_dir=str(classes)
        )
    assert "only 1 image" in caplog.text
    dm.prepare_data()  # nothing to generate
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, True]
    assert batch["pixel_values"][0, 0].mean() == 1 and batch["pixel_values"][1, 2].mean() == 1  # red, blue
    assert len(dm.dataset) == 2


def palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    return image


def test_every_mode_loads_as_rgb(tmp_path):
    makers = {
        "L": Image.new("L", (4, 4), 200),
        "LA": Image.new("LA", (4, 4), (10, 0)),
        "P": palette_image(),
        "RGBA": Image.new("RGBA", (4, 4), (0, 0, 0, 0)),
        "I;16": Image.new("I;16", (4, 4), 0),
    }
    expected = {"L": [200] * 3, "LA": [255] * 3, "P": [0, 128, 0], "RGBA": [255] * 3, "I;16": [0] * 3}
    for mode, image in makers.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image.save(path)
        loaded = load_rgb(path)
        assert loaded.mode == "RGB", mode
        assert np.asarray(loaded)[0, 0].tolist() == expected[mode], mode


def test_truncated_and_fake_images(tmp_path, caplog):
    for i in range(3):
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"good{i}.jpg")
    good = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.jpg").write_text("a text file named .jpg")
    with pytest.raises(ImageFolderError, match="notes.jpg: cannot read image.*data.skip_unreadable=true"):
        DreamBoothDataModule(str(tmp_path), "a sks dog", 64)
    with caplog.at_level(logging.WARNING):
        dm = DreamBoothDataModule(str(tmp_path), "a sks dog", 64, skip_unreadable=True)
    assert len(dm.instance_images) == 3
    assert "notes.jpg" in caplog.text and "truncated.jpg" in caplog.text


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    for i in range(3):
        Image.new("RGB", (40, 30), "red").save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        dm = DreamBoothDataModule(str(tmp_path), "a sks dog", 64)
    assert "3 of 3 images in" in caplog.text and "smaller than the training resolution 64" in caplog.text
    assert "0.png (40x30), 1.png (40x30), 2.png (40x30)" in caplog.text
    dm.setup()
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (1, 3, 64, 64)


def test_noise_and_near_duplicate_photos_are_named_before_training(tmp_path, caplog):
    """A custom subject of random noise, or of one photo saved twice, gets a clear warning when it is loaded;
    the toy world's subjects and the DreamBooth dataset's photos get none."""
    from dreambooth_pl.training.data import load_instance_images
    from tests.conftest import REPO

    rng = np.random.default_rng(0)
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    twice = tmp_path / "twice"
    twice.mkdir()
    photo = Image.open(list_images(str(REPO / "toyworld" / "dataset" / "toy_dog"))[0])
    for name in ("a.png", "b.png", "c.png"):
        photo.save(twice / name)
    with caplog.at_level(logging.WARNING):
        load_instance_images(str(noise), 64)
        load_instance_images(str(twice), 64)
        for folder in [*(REPO / "toyworld" / "dataset").glob("toy_*"), DREAMBOOTH_ROOT / "dataset" / "teapot"]:
            load_instance_images(str(folder), 64)
    warnings = [r.getMessage() for r in caplog.records if "only" not in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert f"subject.instance_dir={noise}: 2 of 2 photos look like random noise" in warnings[0]
    assert "near-duplicate photos (a.png = b.png, a.png = c.png, b.png = c.png)" in warnings[1]


@pytest.mark.parametrize(
    ("subject", "extra", "warned"),
    [("teapot", [], True), ("teapot", ["model.checks=[]"], False), ("toy_teapot", [], False), ("demo", [], False)],
)
def test_the_toy_model_on_photos_from_elsewhere_says_so(subject, extra, warned, tmp_path, caplog):
    """model=toy (the default) with the DreamBooth dataset's teapot: one line naming the real-model command,
    from the check conf/model/toy.yaml registers (`model.checks=[]`: none)."""
    from dreambooth_pl.checks import model_checks
    from dreambooth_pl.util.config import resolve_path
    from tests.conftest import compose_train

    root = tmp_path if subject == "demo" else DREAMBOOTH_ROOT  # demo without a dataset: a toy-world render
    cfg = compose_train([f"subject={subject}", f"paths.dreambooth_root={root}", *extra], tmp_path / "run", tmp_path)
    with caplog.at_level(logging.WARNING):
        model_checks(cfg, resolve_path(cfg.model.pretrained), resolve_path(cfg.subject.instance_dir))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == int(warned)
    if warned:
        assert "model=toy knows only the toy world's cartoons" in messages[0]
        assert "add `model=sd15 trainer=gpu` to this command" in messages[0]
