"""Shared fixtures: Hydra composition of the real configs with the tiny model, offline."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_URL = f"https://github.com/openai/CLIP/raw/main/clip/{CLIP_BPE_NAME}"
SYNTHETIC_PROMPTS = ["in the jungle", "in the snow", "on the beach"] + [f"in test scene {i}" for i in range(3, 25)]


def _project_dreambooth_root() -> Path:
    """Where `python train.py` looks (conf/paths: $DREAMBOOTH_ROOT, else data/dreambooth in the project)."""
    import dreambooth_pl  # noqa: F401  (registers the ${project_root:} resolver)

    paths = OmegaConf.create({"paths": OmegaConf.load(REPO / "conf" / "paths" / "default.yaml")})
    return Path(paths.paths.dreambooth_root)


def synthetic_dreambooth_root(root: Path) -> Path:
    """A small DreamBooth-dataset-shaped folder: every subject of conf/subject/ with 5 rendered photos (the demo
    teapot, a seed per subject) and a `prompts_and_classes.txt` in the dataset's format, with made-up prompts.

    Built once (by rename, so parallel sessions never see half of it); the end-to-end tests then run without
    the real dataset. Tests of the published prompts and photos themselves use `needs_real_dataset`.
    """
    if (root / "dataset" / "prompts_and_classes.txt").is_file():
        return root
    from dreambooth_pl.toyworld.demo_subject import render_demo_subject

    subjects = {}
    for path in sorted((REPO / "conf" / "subject").glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if "${paths.dreambooth_root}/dataset/" in str(config["instance_dir"]):
            subjects[config["name"]] = config["class_noun"]
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    for seed, name in enumerate(subjects):
        rendered = render_demo_subject(staging / "render" / name, num_images=5, size=256, seed=seed)
        for i, png in enumerate(sorted(rendered.glob("*.png"))):
            (staging / "dataset" / name).mkdir(parents=True, exist_ok=True)
            Image.open(png).convert("RGB").save(staging / "dataset" / name / f"{i:02d}.jpg", quality=95)
    prompts = [f"'a {{0}} {{1}} {where}'.format(unique_token, class_token)," for where in SYNTHETIC_PROMPTS]
    lines = ["Classes", "", "subject_name,class", *(f"{k},{v}" for k, v in subjects.items()), "", "Prompts", ""]
    for section in ("Object Prompts", "Live Subject Prompts"):
        lines += [section, "", "prompt_list = [", *prompts, "]", ""]
    (staging / "dataset" / "prompts_and_classes.txt").write_text("\n".join(lines))
    shutil.rmtree(staging / "render")
    try:
        staging.rename(root)
    except OSError:  # another session finished first
        shutil.rmtree(staging)
    return root


def find_dreambooth_root() -> tuple[Path, str]:
    """The DreamBooth dataset where the project finds it, else ../shared, else the synthetic stand-in
    (always with DREAMBOOTH_PL_TEST_DATA=synthetic)."""
    if os.environ.get("DREAMBOOTH_PL_TEST_DATA") == "synthetic":
        why = "DREAMBOOTH_PL_TEST_DATA=synthetic"
    else:
        found = [(_project_dreambooth_root(), "paths.dreambooth_root"), (SHARED / "dreambooth", "../shared")]
        for root, how in found:
            if (root / "dataset" / "prompts_and_classes.txt").is_file():
                return root, f"the DreamBooth dataset at {root} ({how})"
        why = "no DreamBooth dataset at " + " or ".join(f"{root} ({how})" for root, how in found)
    root = synthetic_dreambooth_root(Path(tempfile.gettempdir()) / "dreambooth-pl-tests" / "synthetic-dataset-v1")
    return root, f"a synthetic dataset-shaped stand-in at {root} ({why}; tests of the published data are skipped)"


def find_clip_bpe() -> Path:
    """CLIP's BPE merges: $CLIP_BPE, data/clip-bpe/ or ../shared/clip-bpe/."""
    candidates = [Path(p) for p in [os.environ.get("CLIP_BPE")] if p]
    candidates += [REPO / "data" / "clip-bpe" / CLIP_BPE_NAME, SHARED / "clip-bpe" / CLIP_BPE_NAME]
    return next((p for p in candidates if p.is_file()), candidates[-1])


DREAMBOOTH_ROOT, DATASET_SOURCE = find_dreambooth_root()
REAL_DATASET = not DATASET_SOURCE.startswith("a synthetic")
CLIP_BPE = find_clip_bpe()
CLIP_BPE_MISSING = (
    f"CLIP BPE file not found at $CLIP_BPE, {REPO / 'data' / 'clip-bpe'} or {SHARED / 'clip-bpe'}: download "
    f"{CLIP_BPE_URL} to data/clip-bpe/{CLIP_BPE_NAME} (or set $CLIP_BPE)"
)

# always true now (the synthetic stand-in fills in); kept for the tests that read dataset folders
needs_dataset = pytest.mark.skipif(not (DREAMBOOTH_ROOT / "dataset").is_dir(), reason="no dataset-shaped data")
# the published photos and prompts themselves
needs_real_dataset = pytest.mark.skipif(
    not REAL_DATASET, reason=f"checks the published DreamBooth photos or prompts; the tests ran on {DATASET_SOURCE}"
)
needs_clip_bpe = pytest.mark.skipif(not CLIP_BPE.is_file(), reason=CLIP_BPE_MISSING)


def pytest_sessionstart(session) -> None:
    """Where the data came from, first, also under `-q` (which hides pytest's own report header)."""
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"data: {DATASET_SOURCE}")
        terminal.write_line(f"CLIP BPE: {CLIP_BPE if CLIP_BPE.is_file() else CLIP_BPE_MISSING}")


# A fast but complete run: a dataset subject, a few class images, few sampler steps, no periodic grids.
FAST = [
    "model=tiny",
    "subject=teapot",
    "logger=none",
    "trainer.max_steps=4",
    "prior.num_images=4",
    "sampler.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "export.samples.images_per_prompt=1",
]


@pytest.fixture(autouse=True)
def quiet_console() -> None:
    """The warnings a user's run filters (util/console.py), filtered in each test too: pytest resets the
    filters that importing the package set."""
    from dreambooth_pl.util.console import quiet_libraries

    quiet_libraries()


@pytest.fixture(autouse=True)
def no_wandb_service_left_behind():
    """wandb names its service's socket in WANDB_SERVICE for child processes and leaves it set: a later
    test's subprocess (train.py, evaluate) would try to reach a service that has shut down."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if before is None:
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session: the tiny model is built once and class images are shared."""
    return tmp_path_factory.mktemp("cache")


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as `python train.py` would, with test paths."""
    paths = [
        f"paths.output_dir={output_dir}",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*paths, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def tiny_pretrained(cache_dir) -> str:
    """The tiny model of conf/model/tiny.yaml, built and saved in diffusers layout."""
    from dreambooth_pl.util.config import resolve_path

    cfg = compose_train(FAST, cache_dir / "unused", cache_dir)
    return resolve_path(cfg.model.pretrained)
