"""The toy world: its renderer, its pretraining stages (a few real steps each) and the shipped models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from dreambooth_pl.evaluation.metrics import DinoEmbedder, Preprocess
from dreambooth_pl.evaluation.protocol import read_class_table, read_prompt_lists
from dreambooth_pl.models.pipelines import load_components, loaded_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.pretrain import build
from dreambooth_pl.toyworld.prior import colour_entropy
from dreambooth_pl.toyworld.readers import validate_readers
from dreambooth_pl.toyworld.subjects import GroundTruth, subject_instance, subject_views, write_closeups
from dreambooth_pl.toyworld.world import render_world, world_words
from dreambooth_pl.training.job import train
from dreambooth_pl.util.config import ConfigError, resolve_path
from dreambooth_pl.util.images import load_rgb
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


def test_dev_and_test_subjects_are_declared_and_swept_apart():
    """Tuning (experiment=toy_dev) sweeps only dev subjects and seeds; the tables (experiment=toy_paper) only
    test subjects, one per class, with training and evaluation seeds the dev sweep does not use."""
    subjects = compose_toyworld([]).subjects
    split = {s.name: s.split for s in subjects}
    dev = [s.name for s in subjects if s.split == "dev"]
    test = [s.name for s in subjects if s.split == "test"]
    assert set(split.values()) == {"dev", "test"} and len(dev) >= 3 and len(test) >= 8
    assert {s.cls for s in subjects if s.split == "test"} == set(scenes.CLASSES)
    swept = {}
    for name in ("toy_dev", "toy_paper"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        swept[name] = (params.subject.split(","), set(params.seed.split(",")), cfg.eval.seed, cfg.eval.pres.seed)
    assert swept["toy_dev"][0] == dev and swept["toy_paper"][0] == test
    assert swept["toy_dev"][1].isdisjoint(swept["toy_paper"][1])
    assert swept["toy_dev"][2:] != swept["toy_paper"][2:]
    for spec in subjects:
        subject = OmegaConf.load(REPO / "conf" / "subject" / f"{spec.name}.yaml")
        assert (subject.name, subject.class_noun) == (spec.name, spec.cls)
        assert subject.wrong_class_noun in scenes.CLASSES and subject.wrong_class_noun != spec.cls


def test_subject_photos_are_taken_in_everyday_settings_never_an_evaluation_context():
    spec = compose_toyworld([]).subjects[0]
    settings = [view.context for view in subject_views(spec)]
    assert set(settings) <= set(scenes.PHOTO_SETTINGS) and len(set(settings)) == 3
    assert set(scenes.PHOTO_SETTINGS).isdisjoint(scenes.CONTEXTS)


def test_closeups_show_the_subjects_colours_without_its_outline(tmp_path):
    """experiment=toy_closeup's photos: the same views framed on the subject's middle, so the pixels are its
    two colours and pattern, and its outline (the class, the proportions) is cut by the frame."""
    cfg = compose_toyworld([])
    spec = next(s for s in cfg.subjects if s.name == "heldout_can")  # yellow with blue diagonal stripes
    write_closeups([spec], tmp_path / "closeups", 64, cfg.closeups.crop)
    shipped = sorted((TOYWORLD / "closeups" / spec.name).glob("*.png"))
    assert len(shipped) == spec.views
    for path in shipped:  # the shipped close-ups are what the stage writes
        written = tmp_path / "closeups" / spec.name / path.name
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(written)))

    def subject_pixels(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, float)
        near = [np.linalg.norm(pixels - scenes.COLOURS[c], axis=-1) < 60 for c in (spec.colour, spec.second)]
        return near[0] | near[1]

    inst = subject_instance(spec)
    whole = [subject_pixels(scenes.render(inst, view, 64)) for view in subject_views(spec)]
    close = [subject_pixels(load_rgb(p)) for p in shipped]
    assert max(m.mean() for m in whole) < 0.15 and min(m.mean() for m in close) > 0.4  # 0.11 and 0.47
    assert max(m[-1].mean() for m in whole) == 0 and min(m[-1].mean() for m in close) > 0.3  # cut at the bottom
    with pytest.raises(ConfigError, match="closeups.crop=1.5 must be between 0 and 1"):
        build(compose_toyworld(["closeups.crop=1.5", f"out_dir={tmp_path / 'world'}", "stages=[vae,subjects]"]))
    assert not (tmp_path / "world").exists()  # refused before the VAE trained


def test_a_lookalike_shares_class_and_main_colour_and_differs_visibly():
    rng = np.random.default_rng(0)
    inst = scenes.sample_instance(rng, "vase", patterns=scenes.SUBJECT_PATTERNS)
    for kind in scenes.LOOKALIKES:
        other = scenes.lookalike(rng, inst, kind)
        assert (other.cls, other.colour, other.jitter) == (inst.cls, inst.colour, inst.jitter)
        changed = {
            "pattern": other.pattern != inst.pattern,
            "second colour": other.second != inst.second,
            "proportions": min(abs(a - b) for a, b in zip(other.shape, inst.shape)) >= 0.4 - 1e-9,
        }
        assert all(changed.values()) if kind == "all three" else [k for k, v in changed.items() if v] == [kind]
    truth = GroundTruth(inst, "sks", 64)
    assert truth.lookalike() == truth.lookalike() and truth.lookalike().instance != inst


# --------------------------------------------------------------------------- pretraining stages


@pytest.mark.slow
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
            "dino.groups=16",
            "unet.batch_size=8",
            "unet.lr=2e-3",
            "probe.colours_per_pair=1",
            "probe.images_per_prompt=1",
            "probe.sampler.num_inference_steps=2",
            "probe.classifier.steps=25",
            "probe.classifier.batch_size=16",
            "prior.images=3",
            "prior.guidance=[1.0,5.0]",
            "readers.pairs=4",
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
    # the identifiers' embeddings are as long as a caption word's typical one (not their near-zero init)
    table = parts.text_encoder.get_input_embeddings().weight
    lengths = {
        w: table[parts.tokenizer.convert_tokens_to_ids(f"{w}</w>")].norm().item() for w in ("sks", "zwx", "vase")
    }
    assert lengths["sks"] == pytest.approx(lengths["zwx"], rel=1e-5) and 0.3 < lengths["sks"] / lengths["vase"] < 3
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
    prior = results["prior"]["classes"]
    assert set(prior) == set(cfg.prior.classes)
    assert set(prior["teapot"]) == {"pretraining", "rendered_read", "guidance 1", "guidance 5"}
    assert sum(prior["teapot"]["guidance 5"]["colours"].values()) == 3
    assert (out / "prior" / "prior.md").read_text().count("\n") == 2 + 4 * len(prior)
    rows = results["readers"]["rows"]
    assert len(rows) == 4 * 2 + 2 * 2 and all(0 <= r["win_rate"] <= 1 for r in rows)
    assert (out / "readers" / "readers.md").read_text().count("\n") == len(rows) + 2


def test_colour_entropy_by_hand():
    """The issue's 16 class images at guidance 5: black 8, brown 3, red 3, white 1, green 1."""
    colours = ["black"] * 8 + ["brown"] * 3 + ["red"] * 3 + ["white", "green"]
    by_hand = -(8 / 16 * np.log2(8 / 16) + 2 * 3 / 16 * np.log2(3 / 16) + 2 * 1 / 16 * np.log2(1 / 16))
    assert colour_entropy(colours) == pytest.approx(by_hand) == pytest.approx(1.9056, abs=1e-4)
    assert colour_entropy(list(scenes.COLOURS)) == pytest.approx(np.log2(10))
    assert colour_entropy(["red"] * 5) == 0


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
    default = compose_train([], tmp_path, tmp_path)
    assert default.paths.toyworld_dir == str(REPO / "toyworld")  # the project's folder, from any working directory
    assert default.eval.clip.model == str(REPO / "toyworld" / "clip")  # model=toy brings eval=toy
    overrides = ["model=toy", "subject=toy_teapot", "eval=toy", f"paths.toyworld_dir={TOYWORLD}"]
    cfg = compose_train(overrides, tmp_path, tmp_path)
    assert Path(cfg.model.pretrained) == TOYWORLD / "pipeline"
    assert Path(cfg.subject.instance_dir) == TOYWORLD / "dataset" / "toy_teapot"
    assert Path(cfg.eval.prompts_file) == TOYWORLD / "dataset" / "prompts_and_classes.txt"
    assert Path(cfg.eval.dino.model) == TOYWORLD / "dino"
    assert Path(cfg.eval.clip.model) == TOYWORLD / "clip"
    assert cfg.eval.num_prompts is None and cfg.eval.images_per_prompt == 2  # 4 in experiment=toy_paper


@needs_toyworld
def test_ground_truth_draws_the_subject_in_each_prompts_context(tmp_path):
    """The report's ceiling row: the renderer's own subject (subjects.json) posed by the image's seed."""
    truth = GroundTruth.of(TOYWORLD / "dataset" / "toy_teapot", "sks")
    spec = next(s for s in compose_toyworld([]).subjects if s.name == "toy_teapot")
    assert truth.instance == subject_instance(spec) and truth.size == 64
    assert GroundTruth.of(tmp_path / "teapot", "sks") is None  # not a toy subject: no ground truth

    def expected(instance, context, seed):
        rng = np.random.default_rng(seed)
        return np.asarray(scenes.render(instance, scenes.sample_view(rng, context), 64))

    jungle = truth("a sks teapot in the jungle", 7)
    assert np.array_equal(np.asarray(jungle), expected(truth.instance, "in the jungle", 7))
    red = truth.instance.recoloured("red")
    assert np.array_equal(np.asarray(truth("a red sks teapot", 3)), expected(red, "", 3))
    rng = np.random.default_rng(5)  # PRES's "a teapot": a teapot of the pretraining distribution, studio photo
    prior = scenes.render(scenes.sample_instance(rng, "teapot"), scenes.sample_view(rng, ""), 64)
    assert np.array_equal(np.asarray(truth("a teapot", 5)), np.asarray(prior))
    with pytest.raises(ValueError, match="'a sks teapot on the moon' names no context"):
        truth("a sks teapot on the moon", 0)


@needs_toyworld
def test_div_reader_sees_pose_and_layout_on_the_shipped_vae():
    """The readers stage at a small scale on the shipped world: DIV's VAE-feature distance puts varied renders
    of one prompt farther apart than near-duplicates (the shipped table: 200 pairs per case)."""
    cfg = compose_toyworld(["readers.pairs=24"])
    rows = validate_readers(cfg.readers, TOYWORLD, cfg.data.size, seed=1)["rows"]
    vae = [r for r in rows if r["test"] == "diversity" and r["reader"].startswith("toy VAE")]
    assert len(vae) == 2 and all(r["win_rate"] >= 0.95 and r["passes"] for r in vae), vae


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
    """The shipped model through the normal path: class images, training with its validation (on by default,
    read by the toy world's readers), export, final samples."""
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
        "validation.every_n_steps=3",
        "validation.sampler.num_inference_steps=2",
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
    assert (run_dir / "validation" / "metrics.csv").read_text().splitlines()[0] == "step,dino,clip_i,clip_t"
    assert json.loads((run_dir / "validation" / "selected.json").read_text())["step"] == 3  # the one trained step


def subject_photos() -> list:
    return [load_rgb(p) for p in sorted((TOYWORLD / "dataset" / "toy_teapot").glob("*.png"))]


UNRELATED = "a can on the beach"  # another class in a context: nothing the subject's photos show


@pytest.fixture(scope="module")
def toy_dreambooth(tmp_path_factory):
    """DreamBooth on toy_teapot with the toy recipe (conf/model/toy.yaml), without and with prior preservation."""
    root = tmp_path_factory.mktemp("toy_dreambooth")
    toy = ["model=toy", "subject=toy_teapot", "logger=none", f"paths.toyworld_dir={TOYWORLD}"]
    # the whole 400-step budget these checks were set at (validation off: no step selection)
    quiet = ["export.samples.prompts=[]", "callbacks.samples.every_n_steps=0", "validation.enabled=false"]
    quiet += ["trainer.max_steps=400"]
    runs = {}
    for weight in (0.0, 1.0):
        cfg = compose_train([*toy, *quiet, f"prior.weight={weight}"], root / str(weight), root / "cache")
        runs[weight] = train(cfg)["pipeline"]
    return {"cfg": cfg, "base": resolve_path(cfg.model.pretrained), **runs}


@pytest.mark.slow
@needs_toyworld
def test_prior_preservation_keeps_the_class_prior(toy_dreambooth):
    """The paper's language drift, measured: after DreamBooth on toy_teapot, the model's loss on held-out
    images of the frozen model's own "a teapot" (seeds no run trained on, fixed noise) rises without prior
    preservation and stays at the base model's with it."""
    cfg, base = toy_dreambooth["cfg"], toy_dreambooth["base"]
    cache, seen = instantiate(cfg.prior.cache, pretrained=base), cfg.prior.num_images
    cache.ensure("a teapot", seen + 16)
    heldout = [load_rgb(p) for p in cache.paths("a teapot", seen + 16)[seen:]]
    loss = {name: fixed_probe(toy_dreambooth[name], "a teapot", heldout) for name in ("base", 0.0, 1.0)}
    print(f"held-out class-image loss: base {loss['base']:.4f}, lambda=0 {loss[0.0]:.4f}, lambda=1 {loss[1.0]:.4f}")
    assert loss[1.0] < 0.8 * loss[0.0]


@needs_toyworld
@pytest.mark.xfail(
    strict=True,
    reason="does not reproduce in the toy world: the photos' fixed-noise loss falls nearly as much under an "
    "unrelated prompt (0.228x under 'a sks teapot', 0.278x under 'a can on the beach', 0.229x under 'a teapot')",
)
@pytest.mark.slow
def test_the_identifier_lowers_the_subjects_loss_more_than_an_unrelated_prompt(toy_dreambooth):
    """The issue's binding check as stated: after DreamBooth (lambda=1), the subject's photos are explained
    by "a sks teapot" much better than before, and much more so than by an unrelated prompt (fixed noise):
    its loss falls to less than 0.7x of the unrelated prompt's relative fall."""
    photos = subject_photos()
    ratio = {}
    for prompt in ("a sks teapot", "a teapot", UNRELATED):
        before = fixed_probe(toy_dreambooth["base"], prompt, photos)
        ratio[prompt] = fixed_probe(toy_dreambooth[1.0], prompt, photos) / before
    print("subject loss after / before: " + ", ".join(f"{p!r} {r:.3f}" for p, r in ratio.items()))
    assert ratio["a sks teapot"] < 0.7 * ratio[UNRELATED]


@pytest.mark.slow
@needs_toyworld
def test_the_identifier_renders_the_subject(toy_dreambooth):
    """Binding, read from generated images with the toy DINO (eval=toy): after DreamBooth (lambda=1), "a sks
    teapot" renders the subject, far closer to its photos than the same model's "a teapot" and the base
    model's "a sks teapot" (8 images each, the same seeds)."""
    cfg = toy_dreambooth["cfg"]
    eval_cfg = compose_train(
        ["eval=toy", f"paths.toyworld_dir={TOYWORLD}"], cfg.paths.output_dir, cfg.paths.cache_dir
    ).eval
    dino = DinoEmbedder(
        eval_cfg.dino.model, Preprocess(**{k: eval_cfg.dino[k] for k in ("resize", "crop", "mean", "std")})
    )
    photos = F.normalize(
        dino.images([load_rgb(p) for p in sorted((TOYWORLD / "dataset" / "toy_teapot").glob("*.png"))]), dim=-1
    )
    settings = SamplerSettings(**OmegaConf.to_container(cfg.sampler, resolve=True))
    similarity = {}
    for model, prompt in ((1.0, "a sks teapot"), (1.0, "a teapot"), ("base", "a sks teapot")):
        with loaded_pipeline(toy_dreambooth[model], device="cpu") as pipe:
            images = [image for _, image in render(pipe, [prompt] * 8, list(range(8)), settings)]
        similarity[(model, prompt)] = (F.normalize(dino.images(images), dim=-1) @ photos.T).mean().item()
    print("toy DINO to the subject's photos: " + ", ".join(f"{k}: {v:.3f}" for k, v in similarity.items()))
    trained = similarity[(1.0, "a sks teapot")]
    assert trained > similarity[(1.0, "a teapot")] + 0.2 and trained > similarity[("base", "a sks teapot")] + 0.2
