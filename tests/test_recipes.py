"""The toy model's per-method recipes (conf/model/toy.yaml): `python train.py method=lora` on the toy model
uses the LoRA recipe with no other option, other models keep the methods' own defaults."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.runs.export import LORA_WEIGHTS
from dreambooth_pl.training.job import train
from tests.conftest import compose_train


def test_toy_model_picks_each_methods_recipe(tmp_path, cache_dir):
    lora = compose_train(["method=lora"], tmp_path, cache_dir)
    recipe = lora.model.lora
    assert (lora.method.rank, lora.method.alpha) == (recipe.rank, recipe.alpha)
    assert lora.module.optimizer.lr == recipe.lr and lora.trainer.max_steps == recipe.max_steps
    assert list(lora.method.target_modules) == list(recipe.target_modules)
    ti = compose_train(["method=textual_inversion"], tmp_path, cache_dir)
    recipe = ti.model.textual_inversion
    assert ti.module.optimizer.lr == recipe.lr and ti.trainer.max_steps == recipe.max_steps
    assert ti.prompts.instance == recipe.instance_prompts
    dreambooth = compose_train([], tmp_path, cache_dir)  # its own recipe: module and trainer of the model file
    assert (dreambooth.module.optimizer.lr, dreambooth.trainer.max_steps) == (3.0e-4, 300)


def test_models_without_a_recipe_keep_the_methods_defaults(tmp_path, cache_dir):
    lora = compose_train(["model=tiny", "method=lora"], tmp_path, cache_dir)
    assert (lora.method.rank, lora.method.alpha, lora.module.optimizer.lr) == (4, None, 1.0e-4)  # alpha null: the rank
    assert list(lora.method.target_modules) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert lora.trainer.max_steps == compose_train(["model=tiny"], tmp_path, cache_dir).trainer.max_steps
    ti = compose_train(["model=tiny", "method=textual_inversion"], tmp_path, cache_dir)
    assert (ti.module.optimizer.lr, ti.trainer.max_steps) == (5.0e-4, 3000)
    assert ti.prompts.instance[0] == "a photo of a {identifier}" and len(ti.prompts.instance) == 27


def test_toy_lora_recipe_trains_and_exports_its_conv_adapters(tmp_path, cache_dir):
    """A few steps of the recipe as `method=lora` runs it: the ResNet convolutions' adapters are exported
    beside the attention's, and the exported model loads them (its UNet differs from the base model's)."""
    overrides = ["method=lora", "logger=none", "trainer.max_steps=2", "validation.enabled=false", "prior.enabled=false", "export.samples.prompts=null"]
    cfg = compose_train(overrides, tmp_path, cache_dir)
    export = Path(train(cfg)["pipeline"])
    keys = load_file(export / LORA_WEIGHTS).keys()
    assert any(".conv1." in k for k in keys) and any(".conv2." in k for k in keys) and any(".to_k." in k for k in keys)
    base = load_pipeline(str(Path(cfg.model.pretrained)), "cpu").unet
    tuned = load_pipeline(str(export), "cpu").unet
    tuned.fuse_lora()
    name = next(n for n, _ in base.named_modules() if n.endswith("resnets.0.conv1"))
    assert not torch.equal(base.get_submodule(name).weight, tuned.get_submodule(name).weight)
