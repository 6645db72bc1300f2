"""The evaluation protocol: DreamBench prompts, resumable generation, and a real tiny sweep evaluated end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from dreambooth_pl.evaluation import render as render_module
from dreambooth_pl.evaluation.evaluate import evaluate_from_config, evaluate_run, find_export
from dreambooth_pl.evaluation.protocol import read_class_table, read_prompt_lists, subject_prompts
from dreambooth_pl.evaluation.record import class_noun_condition, provenance_from_config
from dreambooth_pl.evaluation.render import ImageJob, generate_missing
from dreambooth_pl.models import pipelines as models_module
from dreambooth_pl.models.hub import ModelNotReachable
from dreambooth_pl.runs.records import saved_run_config
from dreambooth_pl.util.images import ImageFolderError
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset, needs_real_dataset
from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides
from tests.wandb_records import history_rows

PROMPTS_FILE = DREAMBOOTH_ROOT / "dataset" / "prompts_and_classes.txt"
TEAPOT = DREAMBOOTH_ROOT / "dataset" / "teapot"
# A quick protocol: 2 of the 25 prompts, 2 sampler steps, 2 PRES images; the tiny DINO/CLIP stand-ins.
QUICK = ["eval.num_prompts=2", "eval.sampler.num_inference_steps=2", "eval.pres.num_images=2"]
METRIC_KEYS = {"dino", "clip_i", "clip_t", "pres", "div", "real_dino", "real_clip_i"}


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.dreambooth_root={DREAMBOOTH_ROOT}", *overrides])


def evaluated_sweep(root: Path, cache_dir: Path) -> Path:
    """`train.py -m ablation=ppl` on the tiny model (lambda 0 and 1), both runs evaluated; built once per session.

    Run 0 is evaluated in-process the way training does (provenance from its config, CSV and offline W&B
    loggers, 2 images per prompt); run 1 through `python -m dreambooth_pl.evaluate run_dir=...` with 1 image
    per prompt, so DIV is undefined there.
    """
    sweep = root / "sweep"
    if (sweep / "1" / "eval" / "metrics.json").is_file():
        return sweep
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = [f"paths.dreambooth_root={DREAMBOOTH_ROOT}", f"paths.cache_dir={cache_dir}"]
    train = [sys.executable, str(REPO / "train.py"), "-m", "ablation=ppl", *FAST, "logger=none"]
    train += ["trainer.max_steps=2", "export.samples.prompts=[]", "eval.enabled=false", f"hydra.sweep.dir={sweep}"]
    train += common
    proc = subprocess.run(train, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    tiny = tiny_eval_overrides(tiny_embedding_models(root / "embedders"))
    run = sweep / "0"
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    saved_env = dict(os.environ)  # wandb leaves WANDB_MODE and WANDB_SERVICE behind for every later subprocess
    try:
        os.environ["WANDB_SILENT"] = "true"
        wandb_logger = WandbLogger(offline=True, save_dir=str(run), project="eval-test")
        evaluate_run(
            str(find_export(run)),
            str(run),
            compose_eval([*tiny, *QUICK, "eval.images_per_prompt=2"]).eval,
            str(TEAPOT),
            "teapot",
            "teapot",
            "sks",
            provenance=provenance_from_config(saved_run_config(run)),
            loggers=[CSVLogger(save_dir=run, name="csv"), wandb_logger],
        )
        wandb_logger.experiment.finish()
    finally:
        wandb.teardown()
        os.environ.clear()
        os.environ.update(saved_env)

    command = [sys.executable, "-m", "dreambooth_pl.evaluate", f"run_dir={sweep / '1'}", *tiny, *QUICK, *common]
    command += ["eval.images_per_prompt=1", "eval.div.enabled=false"]
    command += [f"hydra.run.dir={root / 'evaluate-log'}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, cache_dir) -> Path:
    return evaluated_sweep(tmp_path_factory.getbasetemp(), cache_dir)


# --------------------------------------------------------------------------- prompts


@needs_real_dataset
def test_dreambench_prompt_lists_and_classes():
    lists = read_prompt_lists(PROMPTS_FILE)
    assert {k: len(v) for k, v in lists.items()} == {"object": 25, "live": 25}
    assert lists["object"][0] == "a {identifier} {class_noun} in the jungle"
    assert lists["live"][-1] == "a cube shaped {identifier} {class_noun}"
    assert "a {identifier} {class_noun} in a chef outfit" in lists["live"]
    assert "a {identifier} {class_noun} with the Eiffel Tower in the background" in lists["object"]
    table = read_class_table(PROMPTS_FILE)
    assert len(table) == 30 and table["teapot"] == "teapot" and table["bear_plushie"] == "stuffed animal"

    kind, prompts = subject_prompts(PROMPTS_FILE, "dog", "sks")
    assert kind == "live" and len(prompts) == 25 and [p.index for p in prompts] == list(range(25))
    assert prompts[10].text == "a sks dog wearing a red hat"
    assert prompts[10].clip_text == "a dog wearing a red hat"
    assert all("{" not in p.text and "sks" in p.text and "sks" not in p.clip_text for p in prompts)
    assert subject_prompts(PROMPTS_FILE, "cat", "sks")[0] == "live"
    kind, prompts = subject_prompts(PROMPTS_FILE, "stuffed animal", "xyz", num_prompts=3)
    assert kind == "object" and [p.text for p in prompts] == [
        "a xyz stuffed animal in the jungle",
        "a xyz stuffed animal in the snow",
        "a xyz stuffed animal on the beach",
    ]
    # the class-noun ablation: the list follows the real class, the prompt the noun the model was trained
    # with, CLIP-T's text the real class
    kind, prompts = subject_prompts(PROMPTS_FILE, "dog", "sks", instance_class_noun="", num_prompts=1)
    assert kind == "live" and (prompts[0].text, prompts[0].clip_text) == ("a sks in the jungle", "a dog in the jungle")


def test_missing_prompts_file_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.prompts_file=.*dreambooth"):
        read_prompt_lists(tmp_path / "prompts_and_classes.txt")


def test_class_noun_condition():
    assert class_noun_condition("teapot", "teapot") == "correct"
    assert class_noun_condition("teapot", "") == "none"
    assert class_noun_condition("teapot", "dog") == "wrong"


# --------------------------------------------------------------------------- configs


def test_eval_config_defaults_are_the_papers():
    cfg = compose_eval(["run_dir=/runs/x"]).eval
    assert cfg.enabled is True  # the standalone entry evaluates; in training the group default is off
    assert OmegaConf.load(REPO / "conf" / "eval" / "default.yaml").enabled is False
    assert (cfg.dino.model, cfg.clip.model) == ("facebook/dino-vits16", "openai/clip-vit-base-patch32")
    assert (cfg.dino.resize, cfg.dino.crop, cfg.clip.resize, cfg.clip.crop) == (256, 224, 224, 224)
    assert cfg.images_per_prompt == 4 and cfg.num_prompts is None and cfg.div.backend == "auto"
    assert cfg.prompts_file == f"{DREAMBOOTH_ROOT}/dataset/prompts_and_classes.txt"
    assert set(cfg.sampler) == {"scheduler", "num_inference_steps", "guidance_scale", "negative_prompt",
                                "resolution", "batch_size"}  # fmt: skip


def test_eval_group_composes_into_the_training_config(tmp_path):
    wired = any("eval" in entry for entry in OmegaConf.load(REPO / "conf" / "train.yaml").defaults)
    cfg = compose_train(
        ["eval=default" if wired else "+eval=default", "ablation=ppl", "prior.weight=0.0"], tmp_path, tmp_path
    )
    OmegaConf.to_container(cfg.eval, resolve=True)
    assert cfg.eval.enabled is True  # an ablation sweep evaluates every job
    meta = provenance_from_config(cfg)
    assert meta == {
        "method": "dreambooth",
        "model": "toy",  # the default model
        "prior_enabled": True,
        "prior_weight": 0.0,
        "seed": 42,
        "tags": ["ablation_ppl", "prior_weight=0.0"],
    }


def test_bad_eval_values_are_named(tmp_path):
    cfg = compose_eval(["eval.num_prompts=0", "eval.images_per_prompt=0"]).eval
    with pytest.raises(ValueError, match=r"eval.num_prompts=0.*\n.*eval.images_per_prompt=0"):
        evaluate_run(str(tmp_path), str(tmp_path), cfg, str(tmp_path), "teapot", "teapot", "sks")
    with pytest.raises(ValueError, match="run_dir=.*pipeline="):
        evaluate_from_config(compose_eval([]))
    with pytest.raises(ValueError, match="run_dir=.*found none"):
        find_export(tmp_path)


def test_a_base_model_is_evaluated_from_the_command_line(tmp_path):
    """`pipeline=<base model> subject=<name> identifier=sks`: no dreambooth.json, so the subject, its photos,
    class and the identifier come from the subject and identifier groups, and the row is the base model's."""
    toyworld = REPO / "toyworld"
    overrides = [f"paths.toyworld_dir={toyworld}", f"pipeline={toyworld / 'pipeline'}", "subject=toy_teapot"]
    overrides += ["identifier=sks", "eval=toy", "eval.num_prompts=1", "eval.images_per_prompt=2"]
    overrides += ["eval.sampler.num_inference_steps=2", "eval.pres.num_images=2", f"output_dir={tmp_path}"]
    result = evaluate_from_config(compose_eval([*overrides, "logger.wandb=null"]))
    assert result["generated"] == 4
    meta = read_metrics(tmp_path)["metadata"]
    assert (meta["method"], meta["subject"], meta["identifier"], meta["class_noun"]) == (
        "base",
        "toy_teapot",
        "sks",
        "teapot",
    )
    assert meta["real_images_dir"] == str(toyworld / "dataset" / "toy_teapot")
    assert meta["pres_prompt"] == "a teapot" and meta["num_real"] == 5
    assert read_metrics(tmp_path)["images"][0]["prompt"] == "a sks teapot in the jungle"
    with pytest.raises(ValueError, match="identifier is not in .*dreambooth.json: pass identifier="):
        evaluate_from_config(compose_eval([*overrides[:3], "eval=toy", "logger.wandb=null"]))


# --------------------------------------------------------------------------- resumable generation


@pytest.fixture
def fake_renderer(monkeypatch):
    """Count pipeline loads and rendered seeds; an image's colour encodes its seed."""
    calls = {"loads": 0, "seeds": [], "resolution": None}

    def load_pipeline(pipeline, device=None, dtype=None, revision=None, variant=None, vae=None):
        calls["loads"] += 1
        return types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=4)),
                                     vae_scale_factor=2)  # fmt: skip

    def render(pipe, prompts, seeds, settings, desc=None):
        calls["resolution"] = settings.resolution
        for index, seed in enumerate(seeds):
            calls["seeds"].append(seed)
            yield index, Image.new("RGB", (settings.resolution,) * 2, (seed % 256, 0, 0))

    monkeypatch.setattr(models_module, "load_pipeline", load_pipeline)
    monkeypatch.setattr(render_module, "render", render)
    return calls


SAMPLER = {"scheduler": "s", "num_inference_steps": 2, "guidance_scale": 7.5, "negative_prompt": None,
           "resolution": None, "batch_size": 4}  # fmt: skip


def test_generation_reuses_finished_images_and_redoes_only_what_changed(tmp_path, fake_renderer):
    pipeline, images = tmp_path / "pipeline", tmp_path / "eval" / "images"
    pipeline.mkdir()
    (pipeline / "dreambooth.json").write_text(json.dumps({"identifier": "sks", "steps": 10}))
    jobs = [ImageJob(f"p00_{i:02d}.png", "a sks teapot", 1000 + i, 0) for i in range(3)]

    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 3
    assert fake_renderer["resolution"] == 8  # null resolution: the model's native size, 4 x 2
    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 0
    assert fake_renderer["loads"] == 1  # nothing to do: the model is not even loaded

    (images / "p00_01.png").unlink()
    (images / "p00_02.png").write_bytes(b"\x89PNG truncated")
    (images / ".p00_00-killed.png").write_bytes(b"half")  # a write that was killed
    fake_renderer["seeds"].clear()
    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 2
    assert fake_renderer["seeds"] == [1001, 1002] and not list(images.glob(".*.png"))

    more = [*jobs, ImageJob("p00_03.png", "a sks teapot", 1003, 0)]  # more images per prompt: only the new one
    assert generate_missing(str(pipeline), more, images, {**SAMPLER, "batch_size": 1}) == 1

    assert generate_missing(str(pipeline), more, images, {**SAMPLER, "num_inference_steps": 3}) == 4
    (pipeline / "dreambooth.json").write_text(json.dumps({"identifier": "sks", "steps": 20}))  # trained further
    assert generate_missing(str(pipeline), more, images, {**SAMPLER, "num_inference_steps": 3}) == 4
    reseeded = [ImageJob(j.file, j.prompt, j.seed + 1, 0) for j in more[:2]]
    assert generate_missing(str(pipeline), reseeded, images, {**SAMPLER, "num_inference_steps": 3}) == 2
    assert Image.open(images / "p00_00.png").getpixel((0, 0))[0] == 1001 % 256


# --------------------------------------------------------------------------- a real tiny sweep, end to end


def read_metrics(run: Path) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


@needs_dataset
@pytest.mark.parametrize(("run", "weight", "per_prompt"), [("0", 0.0, 2), ("1", 1.0, 1)])
def test_metrics_json_has_every_field_in_range(sweep, run, weight, per_prompt):
    record = read_metrics(sweep / run)
    metrics, meta = record["metrics"], record["metadata"]
    assert set(metrics) == METRIC_KEYS and record["div_backend"] == ("dino" if per_prompt > 1 else None)
    for name in METRIC_KEYS - {"div"}:
        assert math.isfinite(metrics[name]), name  # a number: cosines cannot leave [-1, 1], so no range check
    assert (metrics["div"] is None) == (per_prompt == 1)  # no pair of images to compare
    if per_prompt > 1:
        assert math.isfinite(metrics["div"])
    assert {k: meta[k] for k in ("method", "model", "prior_enabled", "prior_weight", "seed", "tags")} == {
        "method": "dreambooth",
        "model": "tiny",
        "prior_enabled": True,
        "prior_weight": weight,
        "seed": 42,
        "tags": ["ablation_ppl", f"prior_weight={weight}"],
    }
    assert {k: meta[k] for k in ("subject", "identifier", "class_noun", "instance_class_noun")} == {
        "subject": "teapot",
        "identifier": "sks",
        "class_noun": "teapot",
        "instance_class_noun": "teapot",
    }
    assert meta["class_noun_condition"] == "correct" and meta["prompt_set"] == "object" and meta["steps"] == 2
    assert (meta["num_prompts"], meta["images_per_prompt"], meta["num_real"], meta["num_pres"]) == (2, per_prompt, 5, 2)
    n = 2 * per_prompt
    assert meta["num_generated"] == n
    assert meta["pairs"] == {"dino": n * 5, "clip_i": n * 5, "clip_t": n, "pres": 10, "div": 2 * (per_prompt - 1),
                             "real": 10}  # fmt: skip
    assert meta["eval_seed"] == 0 and meta["pres_prompt"] == "a teapot"
    assert [r["seed"] for r in record["images"]] == [1000 * p + i for p in range(2) for i in range(per_prompt)]
    assert [p["prompt"] for p in record["per_prompt"]] == ["a sks teapot in the jungle", "a sks teapot in the snow"]
    assert [p["clip_text"] for p in record["per_prompt"]] == ["a teapot in the jungle", "a teapot in the snow"]
    for row in record["images"]:
        assert (sweep / run / "eval" / row["file"]).is_file()
    mean_dino = sum(r["dino"] for r in record["images"]) / n
    assert metrics["dino"] == pytest.approx(mean_dino)
    with Image.open(sweep / run / "eval" / "grid.png") as grid:
        assert grid.size == (64 * per_prompt, 64 * 2)  # a row per prompt
    assert (sweep / run / "eval" / "pres_grid.png").is_file()


@needs_dataset
def test_loggers_receive_the_summary_and_wandb_the_image_table(sweep):
    with (sweep / "0" / "csv" / "version_0" / "metrics.csv").open() as lines:
        rows = list(csv.DictReader(lines))
    assert {"eval/dino", "eval/clip_i", "eval/clip_t", "eval/pres", "eval/div"} <= set(rows[0])
    assert float(rows[0]["eval/dino"]) == pytest.approx(read_metrics(sweep / "0")["metrics"]["dino"], abs=1e-6)
    run_files = list((sweep / "0" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = {k: v for row in history_rows(run_files[0]) for k, v in row.items()}
    assert logged["eval/images/_type"] == "table-file" and logged["eval/images/nrows"] == 4
    assert logged["eval/grid/_type"] == logged["eval/pres_grid/_type"] == "images/separated"  # a key per size
    assert logged["eval/dino"] == pytest.approx(read_metrics(sweep / "0")["metrics"]["dino"], abs=1e-6)


@needs_dataset
def test_rerun_reuses_every_image(sweep, tmp_path_factory, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a rerun must not load the model")

    monkeypatch.setattr(models_module, "load_pipeline", no_model)
    before = read_metrics(sweep / "1")
    models = tiny_embedding_models(tmp_path_factory.getbasetemp() / "embedders")
    cfg = compose_eval(
        ["run_dir=" + str(sweep / "1"), *tiny_eval_overrides(models), *QUICK, "eval.images_per_prompt=1"]
        + ["eval.div.enabled=false"]
        + ["logger.wandb=null"]  # no W&B run inside the test process
    )
    result = evaluate_from_config(cfg)
    assert result["generated"] == 0
    # the same images scored again; the sweep's process may have used another thread count (float rounding)
    after = read_metrics(sweep / "1")["metrics"]
    assert after.keys() == before["metrics"].keys()
    assert all(after[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in before["metrics"].items() if v is not None)


@needs_dataset
def test_unreachable_embedding_model_fails_before_any_image_is_generated(tmp_path, fake_renderer):
    cfg = compose_eval([*QUICK, "eval.dino.model=facebook/dino-vits16"]).eval
    with pytest.raises(ModelNotReachable, match="eval.dino.model='facebook/dino-vits16'"):
        evaluate_run(str(tmp_path), str(tmp_path), cfg, str(TEAPOT), "teapot", "teapot", "sks")
    assert fake_renderer["loads"] == 0 and not (tmp_path / "eval" / "images").exists()
    with pytest.raises(ImageFolderError, match="eval.real_images_dir=.*does not exist"):
        evaluate_run(str(tmp_path), str(tmp_path), cfg, str(tmp_path / "photos"), "teapot", "teapot", "sks")


def test_a_retrained_model_in_the_same_folder_regenerates_every_image(tmp_path, fake_renderer):
    """Same folder, same dreambooth.json, new weights (a retrain with another learning rate): nothing is reused."""
    pipeline, images = tmp_path / "pipeline", tmp_path / "eval" / "images"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "dreambooth.json").write_text(json.dumps({"identifier": "sks", "steps": 10}))
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"old weights")
    jobs = [ImageJob(f"p00_{i:02d}.png", "a sks teapot", 1000 + i, 0) for i in range(3)]
    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 3
    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 0
    weights.write_bytes(b"new weights, retrained")
    assert generate_missing(str(pipeline), jobs, images, SAMPLER) == 3


@pytest.mark.slow  # a training run of a minute or more: CI runs it (.ci/run)
def test_two_evaluations_started_together_render_each_image_once(tmp_path, tiny_pretrained):
    from tests.test_robustness import start_together

    images = tmp_path / "images"
    script = (
        "from pathlib import Path; from dreambooth_pl.evaluation.render import ImageJob, generate_missing;"
        "jobs = [ImageJob(f'p00_{i:02d}.png', 'a sks teapot', i, 0) for i in range(6)];"
        f"print('generated', generate_missing({tiny_pretrained!r}, jobs, Path({str(images)!r}), "
        "{'num_inference_steps': 2, 'resolution': 32, 'batch_size': 1}))"
    )
    outputs = start_together([script, script], tmp_path)
    counts = sorted(int(out.split("generated ")[-1]) for out in outputs)
    assert counts == [0, 6], outputs  # one rendered everything, the other waited and reused it
    assert sorted(p.name for p in images.glob("*.png")) == [f"p00_{i:02d}.png" for i in range(6)]
