"""What a sweep does not redo: control evaluations kept in the shared cache, and one load of each export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_pl.evaluation import render as render_module
from dreambooth_pl.evaluation.cache import evaluate_cached
from dreambooth_pl.evaluation.evaluate import evaluate_run
from dreambooth_pl.models import pipelines as models_module
from dreambooth_pl.models import samples as samples_module
from dreambooth_pl.toyworld.subjects import GroundTruth
from dreambooth_pl.training.job import train
from tests.conftest import REPO, compose_train
from tests.test_evaluate import compose_eval

TOYWORLD = REPO / "toyworld"
TEAPOT = TOYWORLD / "dataset" / "toy_teapot"
# one prompt, 2 images of it and 2 PRES images, 2 sampler steps: 4 images per evaluation
QUICK = ["eval.num_prompts=1", "eval.images_per_prompt=2", "eval.sampler.num_inference_steps=2"]
QUICK += ["eval.pres.num_images=2"]


@pytest.fixture
def counted(monkeypatch) -> dict:
    """The real renderer and pipeline loader, counting the images they render and the folders they load."""
    counts = {"images": 0, "loads": []}
    render, load = render_module.render, models_module.load_pipeline

    def counting_render(*args, **kwargs):
        for item in render(*args, **kwargs):
            counts["images"] += 1
            yield item

    def counting_load(pretrained, *args, **kwargs):
        counts["loads"].append(str(pretrained))
        return load(pretrained, *args, **kwargs)

    monkeypatch.setattr(render_module, "render", counting_render)
    monkeypatch.setattr(models_module, "load_pipeline", counting_load)
    monkeypatch.setattr(samples_module, "load_pipeline", counting_load)
    return counts


def toy_eval(*overrides: str):
    return compose_eval([f"paths.toyworld_dir={TOYWORLD}", "eval=toy", *QUICK, *overrides]).eval


def test_a_cached_control_evaluation_is_copied_bit_for_bit_and_a_changed_key_renders(tmp_path, counted):
    cache = str(tmp_path / "cache")
    args = (str(TEAPOT), "toy_teapot", "teapot", "sks")
    meta = {"method": "base", "steps": 0, "control": True}
    first = evaluate_cached(cache, str(TOYWORLD / "pipeline"), str(tmp_path / "a"), toy_eval(), *args, provenance=meta)
    assert first["generated"] == 4 and counted["images"] == 4

    again = evaluate_cached(cache, str(TOYWORLD / "pipeline"), str(tmp_path / "b"), toy_eval(), *args, provenance=meta)
    assert again["generated"] == 0 and counted["images"] == 4 and len(counted["loads"]) == 1  # nothing loaded
    metrics = [(tmp_path / run / "eval" / "metrics.json").read_bytes() for run in ("a", "b")]
    assert metrics[0] == metrics[1]
    assert {k: again[k] for k in ("dino", "clip_i", "pres")} == {k: first[k] for k in ("dino", "clip_i", "pres")}
    images = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "eval").rglob("*.png"))
    assert images == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / "eval").rglob("*.png"))

    reseeded = evaluate_cached(
        cache, str(TOYWORLD / "pipeline"), str(tmp_path / "c"), toy_eval("eval.seed=7"), *args, provenance=meta
    )
    assert reseeded["generated"] == 4 and counted["images"] == 8
    other_words = evaluate_cached(
        cache, str(TOYWORLD / "pipeline"), str(tmp_path / "d"), toy_eval(), *args[:3], "blue", provenance=meta
    )
    assert other_words["generated"] == 4 and counted["images"] == 12
    fresh = json.loads((tmp_path / "c" / "eval" / "metrics.json").read_text())
    assert fresh["metadata"]["eval_seed"] == 7


def test_a_drawn_control_is_keyed_by_its_drawing(tmp_path, counted):
    cache = str(tmp_path / "cache")
    truth = GroundTruth.of(TEAPOT, "sks")
    meta = {"method": "renderer", "steps": 0, "control": True}

    def drawn(folder: str, producer) -> dict:
        return evaluate_cached(cache, None, str(tmp_path / folder), toy_eval(), str(TEAPOT), "toy_teapot",
                               "teapot", "sks", provenance=meta, producer=producer)  # fmt: skip

    assert drawn("a", truth)["generated"] == 4
    assert drawn("b", truth)["generated"] == 0
    metrics = [(tmp_path / run / "eval" / "metrics.json").read_bytes() for run in ("a", "b")]
    assert metrics[0] == metrics[1]
    assert drawn("c", truth.lookalike())["generated"] == 4
    assert counted["images"] == 0  # drawings, not a model


@pytest.mark.slow  # a toy training run with its final samples and evaluation
def test_the_export_is_loaded_once_for_samples_and_evaluation_with_a_fresh_loads_numbers(tmp_path, counted, cache_dir):
    overrides = ["model=toy", "subject=toy_teapot", "logger=none", f"paths.toyworld_dir={TOYWORLD}", *QUICK]
    overrides += ["trainer.max_steps=2", "prior.enabled=false", "callbacks.samples.every_n_steps=0", "validation.enabled=false"]
    overrides += ["export.samples.images_per_prompt=1", "sampler.num_inference_steps=2"]
    overrides += ["sampler.scheduler=diffusers.DDIMScheduler", "eval.enabled=true"]  # samples: another sampler
    cfg = compose_train(overrides, tmp_path / "run", cache_dir)
    result = train(cfg)
    pipeline = result["pipeline"]
    assert counted["loads"].count(pipeline) == 1 and Path(result["samples"]).is_file()

    photos = (str(TEAPOT), "toy_teapot", "teapot", result["identifier"])
    alone = evaluate_run(pipeline, str(tmp_path / "alone"), cfg.eval, *photos)  # a fresh load of the export
    assert counted["loads"].count(pipeline) == 2
    run_metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert alone["generated"] == 4
    assert {k: alone[k] for k in run_metrics["metrics"]} == run_metrics["metrics"]
    fresh = json.loads((tmp_path / "alone" / "eval" / "metrics.json").read_text())
    assert fresh["images"] == run_metrics["images"]


def test_render_puts_back_the_scheduler_the_pipeline_was_loaded_with():
    """A shared pipeline's next render starts from the model's scheduler, not the one the last render chose."""
    from dreambooth_pl.models.pipelines import load_pipeline
    from dreambooth_pl.models.sampling import SamplerSettings, render

    pipe = load_pipeline(str(TOYWORLD / "pipeline"), "cpu")
    loaded = pipe.scheduler
    settings = SamplerSettings("diffusers.DDIMScheduler", num_inference_steps=1, resolution=32, batch_size=1)
    ((index, image),) = render(pipe, ["a sks teapot"], [0], settings)
    assert (index, image.size) == (0, (32, 32)) and pipe.scheduler is loaded


def test_an_image_is_the_same_rendered_alone_or_in_a_batch():
    """The evaluation renders eval.sampler.batch_size images at once, each from its own seed's generator, and its
    manifest reuses an image whatever batch made it: batching may move a pixel by float rounding, no more."""
    import dataclasses

    import numpy as np

    from dreambooth_pl.models.pipelines import load_pipeline
    from dreambooth_pl.models.sampling import SamplerSettings, render

    pipe = load_pipeline(str(TOYWORLD / "pipeline"), "cpu")
    prompts, seeds = ["a teapot in the snow"] * 2 + ["a red teapot"] * 2, [0, 1, 1000, 1001]
    settings = SamplerSettings(num_inference_steps=3, guidance_scale=5.0, resolution=64, batch_size=4)
    batched = [np.asarray(image, dtype=int) for _, image in render(pipe, prompts, seeds, settings)]
    one_by_one = dataclasses.replace(settings, batch_size=1)
    alone = [np.asarray(image, dtype=int) for _, image in render(pipe, prompts, seeds, one_by_one)]
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)) <= 1  # 1/255
    assert not np.array_equal(batched[0], batched[1])  # each image its own noise
