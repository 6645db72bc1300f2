"""Validation during training and the step it selects: the rule on hand-made tables, then real short runs on
the tiny model read by the toy world's readers, every method, resume, select=last and bad input."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_pl.training.job import train
from dreambooth_pl.training.validation import select_step
from dreambooth_pl.util.config import ConfigError
from tests.conftest import FAST, compose_train, needs_dataset
from tests.wandb_records import history_rows, run_summary

# Validation every 2 steps of 6, one prompt, one image, 2 sampler steps; checkpoints at every validated step.
VALIDATED = [
    *FAST,
    "eval=toy",  # the toy world's readers: any image can be read by them
    "validation.enabled=true",
    "validation.every_n_steps=2",
    "validation.images_per_prompt=1",
    "validation.prompts=['a {identifier} {class_noun} in the jungle']",
    "validation.sampler.num_inference_steps=2",
    "export.samples.prompts=[]",
    "trainer.max_steps=6",
    "module.optimizer.lr=1e-2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.save_top_k=-1",
]


def rows(*triples) -> list[dict]:
    return [{"step": s, "dino": d, "clip_i": 0.0, "clip_t": t} for s, d, t in triples]


# --------------------------------------------------------------------------- the rule


def test_rule_picks_the_best_subject_fidelity_within_the_clip_t_floor():
    table = rows((0, 0.10, 0.30), (100, 0.40, 0.29), (200, 0.70, 0.20), (300, 0.55, 0.28))
    assert select_step(table, "dino", 0.03)[0] == 300  # 200 has the best DINO but lost 0.10 CLIP-T
    assert select_step(table, "dino", 0.10)[0] == 200  # a looser floor lets it in
    assert select_step(table, "dino", 0.0)[0] == 100  # none within: the highest CLIP-T


def test_rule_ties_go_to_the_earlier_step_and_a_flat_curve_to_the_first_trained_step():
    tied = rows((0, 0.1, 0.3), (100, 0.5, 0.3), (200, 0.5, 0.3), (300, 0.2, 0.3))
    assert select_step(tied)[0] == 100
    flat = rows((0, 0.2, 0.3), (100, 0.2, 0.3), (200, 0.2, 0.3))
    assert select_step(flat)[0] == 100


def test_rule_with_every_step_below_the_floor_takes_the_highest_clip_t_never_the_base_model():
    below = rows((0, 0.9, 0.40), (100, 0.3, 0.20), (200, 0.8, 0.25), (300, 0.9, 0.21))
    step, reason = select_step(below, "dino", 0.05)
    assert step == 200 and "no trained step" in reason
    assert select_step(rows((0, 0.9, 0.4)))[0] is None  # only the base model: nothing to pick


def test_rule_uses_clip_i_when_asked():
    table = [
        {"step": 0, "dino": 0.0, "clip_i": 0.0, "clip_t": 0.3},
        {"step": 1, "dino": 0.9, "clip_i": 0.1, "clip_t": 0.3},
        {"step": 2, "dino": 0.1, "clip_i": 0.9, "clip_t": 0.3},
    ]
    assert select_step(table, "dino")[0] == 1 and select_step(table, "clip_i")[0] == 2


def test_a_new_row_changes_the_choice_only_to_itself():
    """Why the callback keeps one copy of the weights: the choice over steps 0..k+1 is the choice over 0..k or
    step k+1, for any table."""
    rng = random.Random(0)
    for _ in range(500):
        draws = [(s, rng.choice([0.1, 0.2, rng.random()]), rng.choice([0.28, 0.3, rng.random()])) for s in range(8)]
        table = rows(*draws)
        for k in range(2, len(table)):
            before, after = select_step(table[:k])[0], select_step(table[: k + 1])[0]
            assert after in (before, table[k]["step"])


# --------------------------------------------------------------------------- runs


def run(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> dict:
    return train(compose_train([*VALIDATED, *overrides], tmp_path, cache_dir))


def checkpoint_at(run_dir: Path, step: int) -> dict:
    (path,) = (run_dir / "checkpoints").glob(f"epoch=*-step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics_table(run_dir: Path) -> list[dict]:
    with (run_dir / "validation" / "metrics.csv").open() as handle:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("best")
    return run_dir, run(run_dir, cache_dir, [])


@needs_dataset
def test_validation_outputs_and_the_export_is_the_selected_step(best_run):
    run_dir, result = best_run
    table = metrics_table(run_dir)
    assert [r["step"] for r in table] == [0, 2, 4, 6]
    assert list(table[0]) == ["step", "dino", "clip_i", "clip_t"]
    assert all(-1 <= r[k] <= 1 for r in table for k in ("dino", "clip_i", "clip_t"))
    selected = json.loads((run_dir / "validation" / "selected.json").read_text())
    step = select_step(table, "dino", 0.03)[0]
    assert selected["step"] == step and selected["select"] == "best" and "CLIP-T" in selected["rule"]
    (row,) = [r for r in table if r["step"] == step]
    assert selected["metrics"] == {k: pytest.approx(v) for k, v in row.items() if k != "step"}
    assert json.loads((Path(result["pipeline"]) / "dreambooth.json").read_text())["validation"]["step"] == step
    assert Image.open(run_dir / "validation" / "tradeoff.png").size == (640, 520)
    assert not (run_dir / "samples").exists()  # validation rendered the last step: no sample grid beside it
    assert {p.name for p in (run_dir / "validation").glob("step_*.png")} == {f"step_{s:06d}.png" for s in (0, 2, 4, 6)}

    exported = load_file(Path(result["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors")
    at_step = checkpoint_at(run_dir, step)["state_dict"]
    last = checkpoint_at(run_dir, 6)["state_dict"]
    assert step != 6, "this seed's run should select an earlier step, or the test proves nothing"
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in at_step.items())
    assert any(not torch.equal(exported[k.removeprefix("unet.")], v) for k, v in last.items())


@needs_dataset
def test_a_resumed_run_keeps_its_history_and_best_so_far(best_run, tmp_path, cache_dir):
    uninterrupted_dir, uninterrupted = best_run
    run(tmp_path / "a", cache_dir, ["trainer.max_steps=4", "export.enabled=false"])
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (kept,) = [v for k, v in state["callbacks"].items() if k.startswith("Validation")]
    assert [r["step"] for r in kept["history"]] == [0, 2, 4] and kept["weights"]

    resumed = run(tmp_path / "b", cache_dir, [f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"])
    table = metrics_table(tmp_path / "b")
    assert [r["step"] for r in table] == [0, 2, 4, 6]  # steps 0-4 from the checkpoint, 6 measured after resuming
    assert table == [{k: pytest.approx(v, abs=1e-5) for k, v in r.items()} for r in metrics_table(uninterrupted_dir)]
    step = json.loads((tmp_path / "b" / "validation" / "selected.json").read_text())["step"]
    assert step < 6 and step == json.loads((uninterrupted_dir / "validation" / "selected.json").read_text())["step"]
    exported = load_file(Path(resumed["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in checkpoint_at(tmp_path / "a", step)["state_dict"].items():  # the weights kept before resuming
        assert torch.equal(exported[key.removeprefix("unet.")], value)


@needs_dataset
def test_lora_selection_exports_the_adapters_of_the_selected_step(tmp_path, cache_dir):
    """Also the rule on CLIP-I, and PRES as a column."""
    overrides = ["validation.rule.max_clip_t_drop=1.0", "validation.rule.subject_metric=clip_i"]
    result = run(tmp_path, cache_dir, ["method=lora", *overrides, "validation.pres.num_images=1"])
    step = json.loads((tmp_path / "validation" / "selected.json").read_text())["step"]
    table = metrics_table(tmp_path)
    assert list(table[0]) == ["step", "dino", "clip_i", "clip_t", "pres"] and all(-1 <= r["pres"] <= 1 for r in table)
    assert step == select_step(table, "clip_i", 1.0)[0]
    module = result["module"]
    module.load_state_dict(checkpoint_at(tmp_path, step)["state_dict"], strict=False)
    expected = module.family.lora_file_keys(module.method.lora_state(module.denoiser))  # the file's names
    exported = load_file(Path(result["pipeline"]) / "pytorch_lora_weights.safetensors")
    exported = {k.removeprefix("unet."): v for k, v in exported.items()}
    assert step != 6, "this seed's run should select an earlier step, or the test proves nothing"
    assert set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)


@needs_dataset
def test_textual_inversion_selection_exports_the_embedding_of_the_selected_step(tmp_path, cache_dir):
    overrides = ["method=textual_inversion", "trainer.max_steps=4", "validation.rule.max_clip_t_drop=1.0"]
    result = run(tmp_path, cache_dir, overrides)
    step = json.loads((tmp_path / "validation" / "selected.json").read_text())["step"]
    assert step == select_step(metrics_table(tmp_path), "dino", 1.0)[0]
    module = result["module"]
    token_id = module.tokenizers["tokenizer"].convert_tokens_to_ids("<sks>")
    saved = checkpoint_at(tmp_path, step)["state_dict"]
    (table,) = [v for k, v in saved.items() if k.endswith("token_embedding.weight")]
    assert step != 4, "this seed's run should select an earlier step, or the test proves nothing"
    exported = load_file(Path(result["pipeline"]) / "learned_embeds.safetensors")["<sks>"]
    assert torch.equal(exported, table[token_id])


@needs_dataset
@pytest.mark.parametrize("model", ["sdxl_tiny", "flux_tiny", "sd3_tiny"])
def test_every_family_validates_with_its_own_sampler(model, tmp_path, cache_dir):
    run(tmp_path, cache_dir, [f"model={model}", "trainer.max_steps=2", "callbacks.checkpoint.save_top_k=0"])
    assert [r["step"] for r in metrics_table(tmp_path)] == [0, 2]
    assert json.loads((tmp_path / "validation" / "selected.json").read_text())["step"] == 2
    assert Image.open(tmp_path / "validation" / "step_000002.png").height >= 64


@needs_dataset
def test_select_last_exports_bit_for_bit_what_a_run_without_validation_exports(tmp_path, cache_dir):
    short = ["trainer.max_steps=4", "callbacks.checkpoint.save_top_k=0"]
    last = run(tmp_path / "last", cache_dir, [*short, "validation.select=last"])
    plain = run(tmp_path / "plain", cache_dir, [*short, "validation.enabled=false"])
    assert not (tmp_path / "plain" / "validation").exists()
    assert [p.name for p in (tmp_path / "plain" / "samples").iterdir()] == ["step_000004.png"]
    assert json.loads((tmp_path / "last" / "validation" / "selected.json").read_text())["step"] == 4
    files = sorted(p.relative_to(plain["pipeline"]) for p in Path(plain["pipeline"]).rglob("*.safetensors"))
    assert files
    for name in files:
        assert (Path(last["pipeline"]) / name).read_bytes() == (Path(plain["pipeline"]) / name).read_bytes(), name


@needs_dataset
def test_wandb_gets_the_curves_the_images_and_the_selected_step(tmp_path, cache_dir, monkeypatch):
    """The real wandb library, offline: what the run file holds is what W&B would show."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    run(tmp_path, cache_dir, ["logger=wandb", "trainer.max_steps=4", "callbacks.checkpoint.save_top_k=0"])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = history_rows(run_file)
    curve = {r["trainer/global_step"]: r["val/dino"] for r in history if "val/dino" in r}
    table = metrics_table(tmp_path)
    assert curve == {r["step"]: pytest.approx(r["dino"]) for r in table}
    assert all(any(f"val/{k}" in r for r in history) for k in ("clip_i", "clip_t"))
    assert sum("val/images" in r or "val/images/_type" in r for r in history) == len(table)
    selected = json.loads((tmp_path / "validation" / "selected.json").read_text())
    assert run_summary(run_file)["summary"]["val/selected_step"] == selected["step"]


@needs_dataset
def test_a_validation_that_cannot_write_stops_and_the_training_goes_on(tmp_path, cache_dir, caplog):
    (tmp_path / "validation").write_text("a file where the folder goes: every write in it fails")
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path, cache_dir, ["trainer.max_steps=4", "callbacks.checkpoint.save_top_k=0"])
    assert "Validation stopped at step 0" in caplog.text and "exports its last step" in caplog.text
    assert result["global_step"] == 4
    exported = load_file(Path(result["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(exported[k.removeprefix("unet.")], v) for k, v in last.items())


# --------------------------------------------------------------------------- bad input and defaults


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("validation.every_n_steps=0", "validation.every_n_steps=0 must be between 1 and trainer.max_steps=6"),
        ("validation.every_n_steps=7", "validation.every_n_steps=7 must be between 1 and trainer.max_steps=6"),
        ("validation.prompts=[]", "validation.prompts=[] must be a non-empty list"),
        ("validation.prompts=null", "validation.prompts=None must be a non-empty list"),
        ("validation.prompts=['a {class_noun}']", "validation.prompts[0]='a {class_noun}' must contain {identifier}"),
        ("validation.prompts=['a {identifier} {noun}']", "validation.prompts[0]='a {identifier} {noun}' uses unknown"),
        ("validation.prompts=[3]", "validation.prompts[0]=3 must be a prompt template"),
        ("validation.select=first", "validation.select='first': use best or last"),
        ("validation.rule.max_clip_t_drop=-0.1", "validation.rule.max_clip_t_drop=-0.1 must be >= 0"),
        ("validation.dino.model=/nonexistent/dino", "validation.dino.model='/nonexistent/dino'"),
        ("validation.real_images_dir=/nonexistent/photos", "validation.real_images_dir"),
    ],
)
def test_bad_validation_options_are_refused_before_training(tmp_path, cache_dir, override, message):
    with pytest.raises(ConfigError) as refused:
        run(tmp_path, cache_dir, [override])
    assert message in str(refused.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "validation").exists()


def test_validation_is_on_for_the_toy_model_and_off_elsewhere(tmp_path):
    assert compose_train([], tmp_path, tmp_path).validation.enabled
    assert not compose_train(["model=tiny"], tmp_path, tmp_path).validation.enabled
    toy = compose_train([], tmp_path, tmp_path)
    assert toy.validation.dino.model == toy.eval.dino.model and toy.validation.sampler.resolution == 64
