"""Every config composes, and the sweeps and groups mean what the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dreambooth_pl.checks import check_config, prior_active
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, compose_train, needs_dataset

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "identifier", "logger", "trainer", "class_noun", "ablation", "subject"])
def test_every_option_composes_and_resolves(group, tmp_path):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if option == "custom":
            overrides += ["subject.instance_dir=/photos", "subject.class_noun=dog"]
        cfg = compose_train(overrides, tmp_path, tmp_path)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        check_config(cfg)


def test_model_recipes():
    cfg = {m: compose_train([f"model={m}"], Path("/o"), Path("/c")) for m in options("model")}
    assert cfg["tiny"].model.pretrained._target_ == "dreambooth_pl.models.pipelines.build_random_pipeline"
    assert cfg["sd15"].model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg["sd15"].model.resolution, cfg["sd21"].model.resolution) == (512, 768)
    assert cfg["sd15"].module.optimizer.lr == 5e-6
    assert cfg["tiny"].sampler.resolution == 64
    assert cfg["tiny"].module.lr_scheduler.num_training_steps == cfg["tiny"].trainer.max_steps


def test_ablation_sweeps(tmp_path):
    ppl = compose_train(["ablation=ppl"], tmp_path, tmp_path)
    assert ppl.tags[0] == "ablation_ppl"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_ppl = compose("train", overrides=["ablation=ppl"], return_hydra_config=True).hydra
        hydra_cn = compose("train", overrides=["ablation=class_noun"], return_hydra_config=True).hydra
    assert hydra_ppl.sweeper.params == {"prior.weight": "0.0,1.0"}
    assert hydra_cn.sweeper.params == {"class_noun": "correct,none,wrong"}
    # every job is evaluated (the toy model with the toy world's protocol) and the sweep ends with its report
    assert ppl.eval.enabled and ppl.eval.clip.model.endswith("toyworld/clip") and ppl.sweep_name == "ablation_ppl"
    assert not compose_train([], tmp_path, tmp_path).eval.enabled
    reports = {hydra_ppl.callbacks.report._target_, hydra_cn.callbacks.report._target_}
    assert reports == {"dreambooth_pl.reporting.sweep.SweepReport"}

    nouns = {
        v: compose_train([f"class_noun={v}", "subject=teapot"], tmp_path, tmp_path).prompts.instance_class_noun
        for v in options("class_noun")
    }
    assert nouns == {"correct": "teapot", "none": "", "wrong": "dog"}
    tagged = compose_train(["ablation=class_noun", "class_noun=wrong"], tmp_path, tmp_path)
    assert list(tagged.tags) == ["ablation_class_noun", "class_noun=wrong"]


def test_lambda_zero_is_prior_off(tmp_path):
    assert prior_active(compose_train([], tmp_path, tmp_path).prior)
    assert not prior_active(compose_train(["prior.weight=0"], tmp_path, tmp_path).prior)
    assert not prior_active(compose_train(["prior.enabled=false"], tmp_path, tmp_path).prior)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.resolution=60", "model.resolution=60 must be a multiple of 8"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be >= 1"),
        ("prior.weight=-1", "prior.weight=-1 must be >= 0"),
        ("prior.num_images=0", "prior.num_images=0 must be >= 1"),
        ("subject.class_noun=''", "subject.class_noun is empty"),
        ("prompts.instance='a photo of {class_noun}'", "prompts.instance=.* must contain {identifier}"),
        ("model.resolution=0", "model.resolution=0 must be > 0"),
        ("model.resolution=-8", "model.resolution=-8 must be > 0"),
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
        ("prompts.instance='a {identifier} }'", r"prompts.instance='a {identifier} }': Single '}'"),
        ("prompts.prior='a {class_noun'", r"prompts.prior='a {class_noun'"),
        ("prompts.validation=['a {identifier}','a {identifier} {x}']", r"prompts.validation\[1\]=.*unknown field"),
    ],
)
def test_bad_values_are_named(override, message, tmp_path):
    cfg = compose_train([override], tmp_path, tmp_path)
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


def test_default_paths_resolve_against_the_project_from_any_folder(tmp_path):
    """`python /abs/train.py` from another folder reads the toy world, cache and logs of the project."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg", "all", "--resolve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("DREAMBOOTH_PL_TOYWORLD", "DREAMBOOTH_PL_CACHE")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.pretrained == str(REPO / "toyworld" / "pipeline")
    assert cfg.paths.cache_dir == str(REPO / ".cache" / "dreambooth_pl")
    assert cfg.hydra.run.dir.startswith(str(REPO / "logs" / "train" / "runs" / "toy_teapot"))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_local_model_folder_is_no_such_folder(tmp_path):
    from dreambooth_pl.models.hub import ModelNotReachable, require_reachable

    for missing in (str(tmp_path / "nope"), "toyworld/nope/pipeline", "./dino"):
        with pytest.raises(ModelNotReachable, match=r"eval.dino.model=.*: no such folder") as err:
            require_reachable(missing, "eval.dino.model")
        assert "hf download" not in str(err.value)


def test_generate_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("generate", overrides=["generate.pipeline=/runs/x/pipeline"])
    assert cfg.generate.output_dir == "/runs/x/pipeline/../generated"
    assert "{identifier}" in cfg.generate.prompts[0]


@needs_dataset
def test_datamodule_from_config_holds_both_halves(tmp_path, tiny_pretrained):
    cfg = compose_train([*FAST, "data.batch_size=2"], tmp_path, tmp_path)
    cache = instantiate(cfg.prior.cache, pretrained=tiny_pretrained)
    dm = instantiate(
        cfg.data,
        instance_dir=str(DREAMBOOTH_ROOT / "dataset" / "teapot"),
        instance_prompt="a sks teapot",
        class_prompt="a teapot",
        num_class_images=4,
        class_images=cache,
    )
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 5 instance images, 4 class images: 5 items, drop_last with batch 2
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 64, 64)
        assert batch["is_prior"].tolist() == [False, False, True, True]
        assert batch["prompts"] == ["a sks teapot"] * 2 + ["a teapot"] * 2


@pytest.mark.slow  # a training run of a minute or more: CI runs it (.ci/run)
@needs_dataset
def test_ppl_sweep_runs_two_tagged_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "ablation=ppl",
            *FAST,
            "trainer.max_steps=2",
            "export.enabled=false",
            "eval.enabled=false",
            "logger=csv",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={cache_dir}",
            f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = sorted(OmegaConf.load(sweep / str(i) / ".hydra" / "config.yaml").prior.weight for i in (0, 1))
    assert weights == [0.0, 1.0]
    tags = [
        OmegaConf.to_container(OmegaConf.load(sweep / str(i) / ".hydra" / "config.yaml"), resolve=False)["tags"]
        for i in (0, 1)
    ]
    assert all(t[0] == "ablation_ppl" for t in tags)


def test_unknown_subject_lists_the_valid_names(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_train(["subject=teapott"], tmp_path, tmp_path)
    assert "teapott" in str(err.value) and "teapot" in str(err.value) and "wolf_plushie" in str(err.value)
