"""The toy world: its renderer, its pretraining stages (a few real steps each) and the shipped models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from dreambooth_pl.config_utils import resolve_path
from dreambooth_pl.dreambench import read_class_table, read_prompt_lists
from dreambooth_pl.images import load_rgb
from dreambooth_pl.models import load_components
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.pretrain import build, render_world, world_words
from dreambooth_pl.toyworld.subjects import subject_instance
from dreambooth_pl.training import train
from tests.conftest import REPO, compose_train
from tests.test_training import fixed_probe

TOYWORLD = REPO / "toyworld"


def compose_toyworld(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("toyworld", overrides=overrides)


# --------------------------------------------------------------------------- renderer


def test_render_is_deterministic_and_sized():
    rng = np.random.default_rng(0)
    inst, view = scenes.sample_instance(rng, "teapot"), scenes.sample_view(rng, "in the snow")
    first, second = scenes.render(inst, view, 64), scenes.render(inst, view, 64)
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = scenes.render(inst, scenes.View(context="on the beach", seed=view.seed), 64)
    assert np.abs(np.asarray(first, float) - np.asarray(other, float)).mean() > 10  # the context shows


def test_colour_word_is_the_drawn_colour():
    """A "red" object really is mostly red: the caption's colour is what the pixels show."""
    inst = scenes.Instance("can", "red", "white", "plain", (0.5, 0.5, 0.5, 0.5))
    sprite = np.asarray(scenes.draw_object(inst)).astype(float)
    body = sprite[sprite[..., 3] > 0, :3]
    hue_distance = np.linalg.norm(body - np.asarray(scenes.COLOURS["red"]), axis=1)
    assert np.mean(hue_distance < 90) > 0.5


def test_captions_follow_the_dataset_style():
    assert scenes.caption("teapot", "on the beach") == "a teapot on the beach"
    assert scenes.caption("vase", "in the snow", "red") == "a red vase in the snow"
    assert scenes.caption("can") == "a can"


def test_pretraining_never_shows_held_out_pairs_or_subject_patterns():
    held_out = scenes.held_out_pairs()
    assert len(held_out) == 2 * len(scenes.CLASSES)
    assert {cls for cls, _ in held_out} == set(scenes.CLASSES)
    data = render_world(num_instances=60, views=2, size=32, colour_word_prob=0.5, plain_prob=0.1, seed=0)
    shown = {(scenes.CLASSES[c], scenes.CONTEXTS[x]) for c, x in zip(data.cls, data.context)}
    assert not shown & held_out
    assert set(scenes.PRETRAIN_PATTERNS).isdisjoint(scenes.SUBJECT_PATTERNS)
    for caption, c, x, col in zip(data.captions, data.cls, data.context, data.colour):
        colour = list(scenes.COLOURS)[col] if col >= 0 else None
        assert caption == scenes.caption(scenes.CLASSES[c], scenes.CONTEXTS[x], colour)


def test_identifiers_are_rare_words():
    with pytest.raises(ValueError, match="identifiers must be rare"):
        world_words(["sks", "teapot"])
    cfg = compose_toyworld([])
    words = world_words(list(cfg.tokenizer.extra_words))
    assert "sks" in words and len(words) == len(set(words))


def test_subjects_use_patterns_pretraining_never_renders():
    cfg = compose_toyworld([])
    assert len(cfg.subjects) >= 4
    for spec in cfg.subjects:
        assert subject_instance(spec).pattern in scenes.SUBJECT_PATTERNS
    bad = OmegaConf.merge(cfg.subjects[0], {"pattern": "stripes"})
    with pytest.raises(ValueError, match="pattern 'stripes' is one pretraining renders"):
        subject_instance(bad)


# --------------------------------------------------------------------------- pretraining stages


def test_every_stage_trains_and_saves_loadable_models(tmp_path):
    """A few real steps of each stage on a small rendered set: every loss falls, and what is saved loads
    with the standard from_pretrained classes (the pipeline through the project's own loader)."""
    out = tmp_path / "world"
    cfg = compose_toyworld(
        [
            f"out_dir={out}",
            f"cache_dir={tmp_path / 'cache'}",
            "data.num_instances=24",
            "data.views=2",
            *(
                f"{stage}.{key}={value}"
                for stage in ("vae", "clip", "dino", "unet")
                for key, value in (("steps", 25), ("warmup", 1))
            ),
            "vae.batch_size=8",
            "clip.batch_size=16",
            "dino.batch_size=8",
            "unet.batch_size=8",
            "unet.lr=2e-3",
            "probe.colours_per_pair=1",
            "probe.images_per_prompt=1",
            "probe.sampler.num_inference_steps=2",
            "probe.classifier.steps=25",
            "probe.classifier.batch_size=16",
        ]
    )
    results = build(cfg)
    for stage in ("vae", "clip", "dino", "unet"):
        losses = results[stage]
        assert len(losses) == 25 and np.all(np.isfinite(losses)), stage
        assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), (stage, losses[:5], losses[-5:])

    parts = load_components(str(out / "pipeline"))
    assert parts.text_encoder.config.hidden_size == parts.unet.config.cross_attention_dim
    assert len(parts.tokenizer("a sks teapot", add_special_tokens=False).input_ids) == 3
    assert 0.1 < parts.vae.config.scaling_factor < 100
    clip = CLIPModel.from_pretrained(out / "clip")
    # the pipeline's text encoder is the CLIP text tower, weight for weight
    assert torch.equal(
        clip.text_model.embeddings.token_embedding.weight, parts.text_encoder.embeddings.token_embedding.weight
    )
    assert CLIPTokenizer.from_pretrained(out / "clip")("a vase").input_ids == parts.tokenizer("a vase").input_ids
    assert ViTModel.from_pretrained(out / "dino", add_pooling_layer=False).config.image_size == 64

    table = read_class_table(out / "dataset" / "prompts_and_classes.txt")
    assert table == {s.name: s.cls for s in cfg.subjects}
    for spec in cfg.subjects:
        assert len(list((out / "dataset" / spec.name).glob("*.png"))) == spec.views
    probe = results["probe"]
    assert probe["images"] == len(scenes.held_out_pairs())
    assert (out / "probe" / "grid.png").is_file()
    for reader in ("clip", "attribute_probe"):
        for name in ("generated", "rendered"):
            assert set(probe[f"{reader}/{name}"]) == {"class", "context", "colour"}
    assert probe["probe_loss"][1] < probe["probe_loss"][0]


def test_unknown_stage_is_rejected_before_work(tmp_path):
    cfg = compose_toyworld([f"out_dir={tmp_path}", "stages=[vae,unett]"])
    with pytest.raises(ValueError, match=r"\['unett'\] unknown"):
        build(cfg)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- the shipped world

needs_toyworld = pytest.mark.skipif(
    not (TOYWORLD / "pipeline" / "model_index.json").is_file(), reason="toyworld/ not built"
)


@needs_toyworld
def test_toy_prompts_file_reads_as_the_dreambench_format():
    lists = read_prompt_lists(TOYWORLD / "dataset" / "prompts_and_classes.txt")
    published_objects = [f"a {{identifier}} {{class_noun}} {c}" for c in scenes.CONTEXTS[1:]]
    assert lists["object"][: len(published_objects)] == published_objects
    assert lists["object"][-2:] == ["a red {identifier} {class_noun}", "a purple {identifier} {class_noun}"]
    assert len(lists["live"]) == 12


@needs_toyworld
def test_toy_configs_point_at_the_shipped_world(tmp_path):
    assert compose_train([], tmp_path, tmp_path).paths.toyworld_dir == "toyworld"  # the repo's folder
    overrides = ["model=toy", "subject=toy_teapot", "eval=toy", f"paths.toyworld_dir={TOYWORLD}"]
    cfg = compose_train(overrides, tmp_path, tmp_path)
    assert Path(cfg.model.pretrained) == TOYWORLD / "pipeline"
    assert Path(cfg.subject.instance_dir) == TOYWORLD / "dataset" / "toy_teapot"
    assert Path(cfg.eval.prompts_file) == TOYWORLD / "dataset" / "prompts_and_classes.txt"
    assert Path(cfg.eval.dino.model) == TOYWORLD / "dino"
    assert Path(cfg.eval.clip.model) == TOYWORLD / "clip"
    assert cfg.eval.num_prompts is None and cfg.eval.images_per_prompt == 4  # the rest of the protocol stays


@needs_toyworld
def test_shipped_weights_are_small_safetensors():
    files = [p for p in TOYWORLD.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(
        TOYWORLD / "pipeline", safety_checker=None, requires_safety_checker=False
    )
    image = pipe("a red vase in the snow", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@needs_toyworld
def test_train_py_with_the_toy_model_and_a_toy_subject(tmp_path):
    """The shipped model through the normal path: class images, training, export, final samples."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)
    args = [
        "model=toy",
        "subject=toy_teapot",
        "logger=none",
        "trainer.max_steps=3",
        "prior.num_images=2",
        "sampler.num_inference_steps=2",
        "callbacks.samples.every_n_steps=0",
        "export.samples.images_per_prompt=1",
        f"paths.toyworld_dir={TOYWORLD}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert len(list((tmp_path / "cache" / "class_images").glob("a_teapot-*/*.png"))) == 2
    samples = sorted((run_dir / "final_samples").glob("p*.png"))  # one image per validation prompt
    assert len(samples) == 4 and all(Image.open(p).size == (64, 64) for p in samples)  # the toy resolution
    assert (run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_prior_preservation_keeps_the_class_prior(tmp_path):
    """The paper's language drift, measured: after DreamBooth on toy_teapot with the toy recipe, the model's
    loss on held-out images of the frozen model's own "a teapot" (seeds no run trained on, fixed noise)
    rises without prior preservation and stays at the base model's with it."""
    toy = ["model=toy", "subject=toy_teapot", "logger=none", f"paths.toyworld_dir={TOYWORLD}"]
    quiet = ["export.samples.prompts=[]", "callbacks.samples.every_n_steps=0"]
    runs = {}
    for weight in (0.0, 1.0):
        cfg = compose_train([*toy, *quiet, f"prior.weight={weight}"], tmp_path / str(weight), tmp_path / "cache")
        runs[weight] = train(cfg)["pipeline"]
    base = resolve_path(cfg.model.pretrained)
    cache, seen = instantiate(cfg.prior.cache, pretrained=base), cfg.prior.num_images
    cache.ensure("a teapot", seen + 16)
    heldout = [load_rgb(p) for p in cache.paths("a teapot", seen + 16)[seen:]]
    loss = {name: fixed_probe(model, "a teapot", heldout) for name, model in [("base", base), *runs.items()]}
    print(f"held-out class-image loss: base {loss['base']:.4f}, lambda=0 {loss[0.0]:.4f}, lambda=1 {loss[1.0]:.4f}")
    assert loss[1.0] < 0.8 * loss[0.0]
