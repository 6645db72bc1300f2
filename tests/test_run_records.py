"""A run folder is data, never code, and pointing a run at the wrong folder loses nothing (issue 26, items 1-4).

Every attack here is refused before any work, so each case is one quick `train.py` start: exit 1, a message
naming the file and the entry (or the option), and nothing changed in the folder or outside it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dreambooth_pl.evaluation.evaluate import evaluate_from_config
from dreambooth_pl.evaluation.record import provenance_from_config
from dreambooth_pl.runs.layout import WANDB_RUN
from dreambooth_pl.runs.loggers import read_wandb_run
from dreambooth_pl.runs.records import MAX_RECORD_BYTES, saved_run_config
from dreambooth_pl.runs.resume import merge_overrides
from dreambooth_pl.util.config import ConfigError
from tests.conftest import REPO
from tests.test_evaluate import compose_eval
from tests.test_faults import records, saved_run, train_py

SENTINEL = "sentinel-value-7c1e"  # an environment variable's value that must never be written anywhere
# a saved config.yaml of the default run's identity: without the checks, a resume of it would go on to train
SAVED_CONFIG = """\
model: {name: toy, pretrained: '${paths.toyworld_dir}/pipeline'}
method: {name: dreambooth}
subject: {name: toy_teapot, instance_dir: '${paths.toyworld_dir}/dataset/toy_teapot'}
"""


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (a big folder, compared cheaply)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(args: list[str], cwd: Path, *expected: str, env: dict | None = None) -> str:
    """train.py's output for a command that must stop with exit 1, before any work, saying `expected`."""
    os.environ.update(env or {})
    try:
        output = train_py(args, cwd, expect=1)
    finally:
        for key in env or {}:
            del os.environ[key]
    for text in expected:
        assert text in output, output[-3000:]
    assert "Traceback" not in output and "Seed set" not in output  # stopped before the job started
    return output


# --------------------------------------------------------------------------- item 1: the closed world


CRAFTED = {
    # a target reached through a project module's imports: no `_target_` is accepted at all
    "project-import": ("model.vae={_target_:dreambooth_pl.util.config.os.system,command:'touch pwned'}", "_target_"),
    "target-key": ("method._target_=dreambooth_pl.training.job.os.system", "_target_ would instantiate code"),
    "partial": ("module.optimizer={_partial_:true}", "_partial_ would instantiate code"),
    # a config hidden inside a resolver string, which a pattern check never sees
    "resolver": ("model.vae=${oc.decode:'{_target_: os.system, command: touch pwned}'}", "interpolation or resolver"),
    # an allowlisted target with a harmful argument: a checkpoint folder outside the run
    "dirpath": ("callbacks.checkpoint.dirpath={outside}", "a path outside the run folder"),
    "relative-dirpath": ("callbacks.checkpoint.dirpath=../outside", "a path outside the run folder"),
    "cache-elsewhere": ("paths.cache_dir={outside}", "a path outside the run folder and paths.toyworld_dir"),
    "added-key": ("+callbacks.evil.x=1", "adds a key (+)"),
    "force-added": ("++seed=1", "adds a key (+)"),
    "group-path": ("experiment=../../evil", "is not one of conf/experiment/"),
    "hydra-key": ("hydra.callbacks.x=1", "is not an option of the project's configs"),
    "env-secret": ("tags=[${oc.env:SENTINEL_ENV}]", "interpolation or resolver"),
    "sweep": ("seed=1,2", "not a plain key=value"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_resume_accepts_only_what_the_projects_configs_could_have_produced(tmp_path, case):
    """Each crafted saved override stops the resume naming the file and the entry; nothing runs, nothing in the
    folder or beside it changes (no `.hydra/` rewrite, no history copy, no lock left holding)."""
    outside = tmp_path / "outside"
    override, message = CRAFTED[case]
    override = override.replace("{outside}", str(outside))
    run = saved_run(tmp_path / "run", SAVED_CONFIG, f"- trainer.max_steps=3\n- {json.dumps(override)}\n")
    before = records(run)
    output = refused(
        [f"hydra.run.dir={run}", "ckpt_path=last"],
        tmp_path,
        f"{run / '.hydra' / 'overrides.yaml'}, entry 2 ({override!r})",
        message,
        "Not resuming",
        env={"SENTINEL_ENV": SENTINEL},
    )
    assert SENTINEL not in output
    assert records(run) == before and not outside.exists() and not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_saved_overrides_the_command_sets_again_are_not_judged(tmp_path):
    """A resume may replace a saved setting it would refuse: the command's own value (and anything under it)
    wins, so only what the run folder alone asks for is checked."""
    merged = merge_overrides(["+callbacks.sigterm._target_=x.Y", "seed=1"], ["++callbacks.sigterm=null"])
    assert merged == ["seed=1", "++callbacks.sigterm=null"]
    run = saved_run(tmp_path / "run", SAVED_CONFIG, f"- callbacks.checkpoint.dirpath={tmp_path / 'x'}\n")
    output = train_py(
        [f"hydra.run.dir={run}", "ckpt_path=last", f"callbacks.checkpoint.dirpath={run}/checkpoints"]
        + ["trainer.max_steps=0"],
        tmp_path,
        expect=1,
    )
    assert "Resuming" in output and "trainer.max_steps=0 must be >= 1" in output  # got to the job's checks


OLD_LAYOUT = """\
method: {_target_: dreambooth_pl.methods.LoRA, name: lora, rank: 4}
model:
  name: toy
  pretrained: ${paths.toyworld_dir}/pipeline
subject: {name: toy_teapot, instance_dir: '${paths.toyworld_dir}/dataset/toy_teapot', class_noun: teapot}
logger: {wandb: {_target_: dreambooth_pl.loggers.wandb_logger}}
"""


def test_an_old_layout_run_folder_resumes_from_the_projects_current_configs(tmp_path):
    """A run saved before the package moves names `dreambooth_pl.methods.LoRA` in its config.yaml: a resume
    composes the current configs with its saved overrides, so the old targets are never imported."""
    run = saved_run(tmp_path / "run", OLD_LAYOUT, "- method=lora\n- trainer.max_steps=0\n")
    output = train_py([f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, expect=1)
    assert "Resuming" in output and "trainer.max_steps=0 must be >= 1" in output  # the job's own checks
    assert (run / ".hydra" / "history" / "0" / "config.yaml").read_text() == OLD_LAYOUT
    assert "dreambooth_pl.training.methods.LoRA" in (run / ".hydra" / "config.yaml").read_text()


# --------------------------------------------------------------------------- item 3: a broken record stops


BROKEN = {
    "overrides-not-a-list": (SAVED_CONFIG, "{trainer.max_steps: 3}\n", "overrides.yaml is not a list of overrides"),
    "overrides-not-strings": (SAVED_CONFIG, "- 3\n- [a]\n", "overrides.yaml is not a list of overrides"),
    "overrides-missing": (SAVED_CONFIG, None, "overrides.yaml is missing"),
    "config-not-a-mapping": ("- a\n", "- seed=1\n", "config.yaml is not a saved config"),
    "config-missing": (None, "- seed=1\n", "config.yaml cannot be read (FileNotFoundError"),
    "alias-bomb": (SAVED_CONFIG, "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "uses YAML aliases"),
    "oversized": (SAVED_CONFIG, "- seed=1\n" + "#" * MAX_RECORD_BYTES, "more than any record Hydra writes"),
    "unparsable": (SAVED_CONFIG, "- 'seed=[1'\n", "entry 1 ('seed=[1'): does not parse"),
    "unknown-key": (SAVED_CONFIG, "- trainer.max_stepz=3\n", "do not compose"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_any_problem_with_the_saved_record_stops_the_resume_naming_the_file(tmp_path, case):
    """Not a warning and a run of the default recipe: exit 1, the file named, the folder as it was."""
    config, overrides, message = BROKEN[case]
    run = saved_run(tmp_path / "run", config or "", overrides or "")
    for name, text in (("config.yaml", config), ("overrides.yaml", overrides)):
        if text is None:
            (run / ".hydra" / name).unlink()
    before = records(run)
    refused([f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, str(run / ".hydra"), message)
    assert records(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --------------------------------------------------------------------------- item 2: the environment


@pytest.mark.parametrize(
    "override",
    [
        "tags=[${oc.env:SENTINEL_ENV}]",
        "subject.name=${oc.env:SENTINEL_ENV}",
        "identifier.token=${oc.env:SENTINEL_ENV}",
        "prompts.instance='a ${oc.decode:\"${oc.env:SENTINEL_ENV}\"} {identifier} {class_noun}'",
        "logger.wandb.name=${oc.env:SENTINEL_ENV,x}",
        "hydra.run.dir={tmp}/${oc.env:SENTINEL_ENV}",
    ],
)
def test_no_environment_variable_reaches_a_record(tmp_path, override):
    """Only the variables the project's configs name (path roots) are read; any other one typed into an
    override, a tag, a name or the run folder stops the run naming the option, and its value is nowhere."""
    args = [override.replace("{tmp}", str(tmp_path))]
    if not override.startswith("hydra.run.dir"):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    output = refused(args, tmp_path, "${oc.env:SENTINEL_ENV", "reads only the environment variables its configs name",
                     env={"SENTINEL_ENV": SENTINEL})
    assert SENTINEL not in output and list(tmp_path.iterdir()) == []


def test_a_saved_config_is_data_old_layout_and_resolvers_included(tmp_path):
    """config.yaml of an earlier package layout, with a resolver, an environment read and references:
    references are answered from the run's own files, everything else stays literal, nothing is imported."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "method: {_target_: dreambooth_pl.methods.LoRA, name: lora}\n"
        "model: {name: toy, pretrained: {_target_: dreambooth_pl.models.build_random_pipeline}}\n"
        "seed: 3\nprior:\n  enabled: true\n  weight: ${seed}\n"
        "tags: ['${oc.env:SENTINEL_ENV}', 'row=${hydra:runtime.choices.toy_row}', \"${oc.decode:'{a: 1}'}\"]\n"
    )
    (tmp_path / ".hydra" / "hydra.yaml").write_text("hydra: {runtime: {choices: {toy_row: lora}}}\n")
    os.environ["SENTINEL_ENV"] = SENTINEL
    try:
        meta = provenance_from_config(saved_run_config(tmp_path))
    finally:
        del os.environ["SENTINEL_ENV"]
    assert meta["method"] == "lora" and meta["model"] == "toy" and meta["prior_weight"] == 3
    assert meta["tags"] == ["${oc.env:SENTINEL_ENV}", "row=lora", "${oc.decode:'{a: 1}'}"]


def test_the_wandb_run_record_is_an_id_and_plain_labels(tmp_path):
    (tmp_path / "wandb").mkdir()
    path = tmp_path / "wandb" / WANDB_RUN
    good = {"id": "ab12cd34", "project": "p", "name": "teapot-lora", "group": None, "job_type": "train"}
    path.write_text(json.dumps(good))
    assert read_wandb_run(tmp_path) == good
    for bad, message in [
        ({**good, "entity": "someone-else"}, "entity: not a key this project writes"),
        ({**good, "settings": {"mode": "online"}}, "settings: not a key"),
        ({**good, "id": "../x"}, "no run id"),
        ({**good, "name": {"_target_": "os.system"}}, "name is not a plain label"),
        ({**good, "group": "x" * 200}, "group is not a plain label"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            read_wandb_run(tmp_path)


# --------------------------------------------------------------------------- item 4: the wrong folder


@pytest.mark.parametrize("folder", ["toyworld", "toyworld/pipeline", "conf", "dreambooth_pl", "tests", "."])
def test_a_run_folder_in_the_projects_source_or_data_is_refused(tmp_path, folder):
    target = (REPO / folder).resolve()
    before = tree(target) if folder != "." else sorted(p.name for p in REPO.iterdir())
    refused([f"hydra.run.dir={target}"], tmp_path, f"The run folder {target}", "a run would overwrite files there")
    assert (tree(target) if folder != "." else sorted(p.name for p in REPO.iterdir())) == before


def test_an_unrelated_folder_a_finished_run_and_a_name_that_leaves_logs_are_refused(tmp_path):
    other = tmp_path / "photos"
    (other / "samples").mkdir(parents=True)
    (other / "samples" / "keep.png").write_bytes(b"mine")
    refused([f"hydra.run.dir={other}"], tmp_path, f"{other} is not empty and is not a run folder")
    assert (other / "samples" / "keep.png").read_bytes() == b"mine"
    assert sorted(p.name for p in other.iterdir()) == ["samples"]

    finished = saved_run(tmp_path / "finished", "seed: 42\n", "- seed=1\n")
    (finished / "checkpoints").mkdir()
    (finished / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (finished / "pipeline").mkdir()
    (finished / "pipeline" / "dreambooth.json").write_text("{}")
    before = records(finished)
    refused(
        [f"hydra.run.dir={finished}"],
        tmp_path,
        f"python train.py hydra.run.dir={finished} ckpt_path=last",
        "leave out hydra.run.dir, or give a new folder",
    )
    assert records(finished) == before

    logs = tmp_path / "logs"
    refused(["subject.name=../../..", f"paths.log_dir={logs}"], tmp_path, f"is not under paths.log_dir ({logs})")
    refused(["-m", "sweep_name=../../../../x", f"paths.log_dir={logs}"], tmp_path, "sweep_name='../../../../x' becomes")
    conf = tree(REPO / "conf")
    refused(["-m", f"hydra.sweep.dir={REPO / 'conf'}", "seed=1,2"], tmp_path, "Leave out hydra.sweep.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished", "photos"] and tree(REPO / "conf") == conf


@pytest.mark.slow  # renders a few toy images and scores them: about 30 s
def test_an_old_layout_run_folder_evaluates(tmp_path):
    """A run saved before the package moves (`dreambooth_pl.methods.*` targets in its config.yaml) is
    evaluated from its export and its config read as data, with this command's own logger."""
    toyworld = REPO / "toyworld"
    run = tmp_path / "old-run"
    shutil.copytree(toyworld / "pipeline", run / "pipeline")
    info = {"subject": "toy_teapot", "identifier": "sks", "class_noun": "teapot", "method": "dreambooth", "steps": 1}
    info |= {"instance_dir": str(toyworld / "dataset" / "toy_teapot"), "base_model": str(toyworld / "pipeline")}
    (run / "pipeline" / "dreambooth.json").write_text(json.dumps(info))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "method: {_target_: dreambooth_pl.methods.DreamBooth, name: dreambooth}\n"
        "logger: {wandb: {_target_: dreambooth_pl.loggers.wandb_logger, project: elsewhere}}\n"
        "model: {name: toy}\nsubject: {name: toy_teapot, class_noun: teapot}\nseed: 5\ntags: [old]\n"
    )
    cfg = compose_eval(
        [f"run_dir={run}", "eval=toy", "eval.num_prompts=1", "eval.pres.num_images=0", "logger.wandb=null"]
        + ["eval.sampler.num_inference_steps=2", "eval.div.enabled=false", "eval.images_per_prompt=1"]
    )
    result = evaluate_from_config(cfg)
    metadata = json.loads(Path(result["metrics_file"]).read_text())["metadata"]
    assert metadata["seed"] == 5 and metadata["tags"] == ["old"] and metadata["model"] == "toy"
    assert metadata["class_noun"] == "teapot" and result["dino"] is not None
