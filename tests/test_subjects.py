"""Subject configs (conf/subject/) and the rendered demo subject."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from dreambooth_pl.toyworld import demo_subject
from dreambooth_pl.toyworld.demo_subject import demo_instance_dir, render_demo_subject
from tests.conftest import DREAMBOOTH_ROOT, needs_real_dataset

REPO = Path(__file__).resolve().parents[1]
SUBJECT_DIR = REPO / "conf" / "subject"
DATASET = DREAMBOOTH_ROOT / "dataset"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
SPECIAL = {"demo", "custom"}
KEYS = {"name", "instance_dir", "class_noun", "wrong_class_noun"}
HEADER = "# DreamBooth dataset subject (class from prompts_and_classes.txt)"


def toy_subject_files() -> list[Path]:
    """The toy world's subjects (dev and test): their photos are under the toy world, not the dataset."""
    return sorted(p for p in SUBJECT_DIR.glob("*.yaml") if "${paths.toyworld_dir}" in p.read_text())


def dataset_subject_files() -> list[Path]:
    toy = set(toy_subject_files())
    return sorted(p for p in SUBJECT_DIR.glob("*.yaml") if p.stem not in SPECIAL and p not in toy)


def read_class_table() -> dict[str, str]:
    """The `subject_name,class` table at the top of prompts_and_classes.txt."""
    lines = (DATASET / "prompts_and_classes.txt").read_text().splitlines()
    start = lines.index("subject_name,class") + 1
    table = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, cls = line.split(",", 1)
        table[name.strip()] = cls.strip()
    return table


def resolved(path: Path, paths: dict) -> dict:
    cfg = OmegaConf.merge(OmegaConf.create({"paths": paths}), {"subject": OmegaConf.load(path)})
    return OmegaConf.to_container(cfg.subject, resolve=True)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- configs


def test_thirty_dataset_subject_configs_with_exact_keys():
    files = dataset_subject_files()
    assert len(files) == 30
    for f in files:
        assert f.read_text().splitlines()[0] == HEADER, f
        cfg = OmegaConf.load(f)
        assert set(cfg.keys()) == KEYS, f
        assert cfg.name == f.stem
        assert OmegaConf.to_container(cfg)["instance_dir"] == f"${{paths.dreambooth_root}}/dataset/{f.stem}"


@needs_real_dataset
def test_subject_configs_match_prompts_and_classes():
    table = read_class_table()
    assert len(table) == 30
    configs = {f.stem: OmegaConf.load(f) for f in dataset_subject_files()}
    assert set(configs) == set(table)
    for name, cls in table.items():
        assert configs[name].name == name
        assert configs[name].class_noun == cls, name


@needs_real_dataset
@pytest.mark.parametrize("path", dataset_subject_files(), ids=lambda p: p.stem)
def test_instance_dir_resolves_to_folder_with_images(path):
    cfg = resolved(path, {"dreambooth_root": str(DREAMBOOTH_ROOT), "cache_dir": "/unused"})
    folder = Path(cfg["instance_dir"])
    assert folder == DATASET / path.stem
    assert folder.is_dir()
    assert len(image_files(folder)) >= 1


@pytest.mark.parametrize(
    "path",
    dataset_subject_files() + toy_subject_files() + [SUBJECT_DIR / "demo.yaml"],
    ids=lambda p: p.stem,
)
def test_wrong_class_noun_rule(path):
    cfg = OmegaConf.load(path)
    live = cfg.class_noun in ("cat", "dog")
    assert cfg.wrong_class_noun == ("backpack" if live else "dog")
    assert cfg.wrong_class_noun != cfg.class_noun


def test_custom_subject_requires_dir_and_class():
    cfg = OmegaConf.load(SUBJECT_DIR / "custom.yaml")
    assert set(cfg.keys()) == KEYS
    assert cfg.name == "custom"
    assert OmegaConf.is_missing(cfg, "instance_dir")
    assert OmegaConf.is_missing(cfg, "class_noun")
    assert "subject=custom subject.instance_dir=" in (SUBJECT_DIR / "custom.yaml").read_text()


def test_demo_config_instantiates_to_render_folder_without_dataset(tmp_path):
    cfg = OmegaConf.merge(
        OmegaConf.create(
            {"paths": {"dreambooth_root": str(tmp_path / "no_dreambooth"), "cache_dir": str(tmp_path / "cache")}}
        ),
        {"subject": OmegaConf.load(SUBJECT_DIR / "demo.yaml")},
    )
    assert set(cfg.subject.keys()) == KEYS
    assert cfg.subject.class_noun == "teapot"
    out = instantiate(cfg.subject.instance_dir)
    assert isinstance(out, str)
    assert Path(out) == tmp_path / "cache" / "demo_subject"
    assert len(image_files(Path(out))) == cfg.subject.instance_dir.num_images


@needs_real_dataset
def test_demo_config_instantiates_to_dataset_teapot(tmp_path):
    cfg = OmegaConf.merge(
        OmegaConf.create({"paths": {"dreambooth_root": str(DREAMBOOTH_ROOT), "cache_dir": str(tmp_path / "cache")}}),
        {"subject": OmegaConf.load(SUBJECT_DIR / "demo.yaml")},
    )
    out = instantiate(cfg.subject.instance_dir)
    assert isinstance(out, str)
    assert Path(out) == DATASET / "teapot"
    assert not (tmp_path / "cache").exists()  # nothing rendered


# --------------------------------------------------------------------------- rendering


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in image_files(folder)}


def test_render_gives_distinct_rgb_images_of_right_size(tmp_path):
    out = render_demo_subject(tmp_path / "r", num_images=4, size=96, seed=3)
    assert out == tmp_path / "r"
    files = image_files(out)
    assert [p.name for p in files] == [f"demo_{i:02d}.png" for i in range(4)]
    arrays = [load(p) for p in files]
    for a in arrays:
        assert a.shape == (96, 96, 3)
        assert a.std() > 10  # not a blank canvas
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(arrays[i].astype(int) - arrays[j].astype(int)).mean() > 5, (i, j)


def test_render_is_deterministic_per_seed(tmp_path):
    a = digests(render_demo_subject(tmp_path / "a", num_images=3, size=64, seed=7))
    b = digests(render_demo_subject(tmp_path / "b", num_images=3, size=64, seed=7))
    c = render_demo_subject(tmp_path / "c", num_images=3, size=64, seed=8)
    assert a == b
    assert not np.array_equal(load(tmp_path / "a" / "demo_00.png"), load(c / "demo_00.png"))
    # A view does not depend on how many views were asked for.
    d = digests(render_demo_subject(tmp_path / "d", num_images=2, size=64, seed=7))
    assert d == {k: v for k, v in a.items() if k in d}


def test_second_call_renders_nothing(tmp_path, monkeypatch):
    out = render_demo_subject(tmp_path / "r", num_images=3, size=64)
    mtimes = {p: p.stat().st_mtime_ns for p in image_files(out)}

    def boom(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(demo_subject, "_render_view", boom)
    assert render_demo_subject(tmp_path / "r", num_images=3, size=64) == out
    assert {p: p.stat().st_mtime_ns for p in image_files(out)} == mtimes


def test_missing_view_is_rerendered_alone(tmp_path):
    out = render_demo_subject(tmp_path / "r", num_images=3, size=64)
    before = digests(out)
    keep = {p: p.stat().st_mtime_ns for p in image_files(out) if p.name != "demo_01.png"}
    (out / "demo_01.png").unlink()
    render_demo_subject(out, num_images=3, size=64)
    assert digests(out) == before
    assert {p: p.stat().st_mtime_ns for p in keep} == keep


def test_changed_parameters_rerender(tmp_path):
    out = render_demo_subject(tmp_path / "r", num_images=4, size=64)
    render_demo_subject(out, num_images=2, size=80)
    files = image_files(out)
    assert [p.name for p in files] == ["demo_00.png", "demo_01.png"]
    assert all(load(p).shape == (80, 80, 3) for p in files)


def test_stale_temp_file_is_ignored(tmp_path, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    stale = out / ".demo_00.png.x1y2z3.tmp"
    stale.write_bytes(b"half a png")  # left behind by a killed writer
    render_demo_subject(out, num_images=2, size=64)
    assert [p.name for p in image_files(out)] == ["demo_00.png", "demo_01.png"]
    assert load(out / "demo_00.png").shape == (64, 64, 3)
    # A folder whose only "image" is a temp file is not a dataset folder.
    only_tmp = tmp_path / "only_tmp"
    only_tmp.mkdir()
    (only_tmp / ".00.jpg.abc.tmp").write_bytes(b"x")
    assert demo_instance_dir(str(only_tmp), str(tmp_path / "render"), num_images=1, size=32) == str(tmp_path / "render")
    # And with the temp file still there, a complete cache is reused untouched.
    monkeypatch.setattr(demo_subject, "_render_view", lambda *a, **k: pytest.fail("rendered again"))
    render_demo_subject(out, num_images=2, size=64)


# --------------------------------------------------------------------------- demo_instance_dir


def test_demo_instance_dir_prefers_dataset_folder(tmp_path, caplog):
    ds = tmp_path / "teapot"
    ds.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(ds / "00.JPG", format="JPEG")
    with caplog.at_level(logging.INFO, logger="dreambooth_pl.toyworld.demo_subject"):
        got = demo_instance_dir(str(ds), str(tmp_path / "render"))
    assert got == str(ds)
    assert not (tmp_path / "render").exists()
    assert str(ds) in caplog.text


@pytest.mark.parametrize("make_empty", [False, True], ids=["missing", "empty"])
def test_demo_instance_dir_renders_when_dataset_absent(tmp_path, caplog, make_empty):
    ds = tmp_path / "teapot"
    if make_empty:
        ds.mkdir()
    with caplog.at_level(logging.INFO, logger="dreambooth_pl.toyworld.demo_subject"):
        got = demo_instance_dir(str(ds), str(tmp_path / "render"), num_images=2, size=48, seed=1)
    assert got == str(tmp_path / "render")
    assert [load(p).shape for p in image_files(Path(got))] == [(48, 48, 3)] * 2
    assert "render" in caplog.text


@needs_real_dataset
def test_demo_instance_dir_uses_real_teapot(tmp_path):
    assert demo_instance_dir(str(DATASET / "teapot"), str(tmp_path / "render")) == str(DATASET / "teapot")
