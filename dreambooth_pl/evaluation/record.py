"""The evaluation's record, `<output_dir>/eval/metrics.json`: what the report reads of a run. The metrics,
one row per image and per prompt, and the metadata that says what was scored, how the model was trained and
with which protocol settings."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.evaluation.protocol import EvalPrompt
from dreambooth_pl.evaluation.render import ImageJob
from dreambooth_pl.runs.export import read_export_info
from dreambooth_pl.runs.layout import EVAL_DIR, EVAL_HISTORY, EVAL_IMAGES, METRICS_FILE
from dreambooth_pl.util.files import write_json_atomically

log = logging.getLogger(__name__)


def class_noun_condition(class_noun: str, instance_class_noun: str) -> str:
    """The class-noun ablation's row (paper Table 4): the noun in the instance prompt vs the real class."""
    if not instance_class_noun.strip():
        return "none"
    return "correct" if instance_class_noun.strip() == class_noun.strip() else "wrong"


def provenance_from_config(cfg: DictConfig) -> dict:
    """How a run was trained, as the report groups runs: pass this as `provenance` from a training config.

    Values that cannot be resolved (a `${hydra:...}` outside the run) are left out rather than guessed.
    """

    def get(key: str):
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=False)

    method = get("method")
    if isinstance(method, DictConfig):
        method = method.get("name")
    tags = get("tags")
    tags = [get(f"tags[{i}]") for i in range(len(tags))] if tags is not None else []
    return {
        "method": method or "dreambooth",
        "model": get("model.name"),
        "prior_enabled": get("prior.enabled"),
        "prior_weight": get("prior.weight"),
        "seed": get("seed"),
        "tags": [str(t) for t in tags if t is not None],
    }


def model_location(name: str) -> str:
    """A local model folder as an absolute path, a hub id as given: the report finds the readers table
    beside the DINO model (`report.unvalidated_columns`) from whatever folder it runs in."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def eval_metadata(
    cfg: DictConfig,
    pipeline_dir: str | None,
    provenance: dict | None,
    names: dict,
    real_images_dir: str,
    prompt_set: str,
    prompts: list[EvalPrompt],
    pres_jobs: list[ImageJob],
    counts: dict,
) -> dict:
    """What was scored and how: `names` the subject, identifier, class noun and instance class noun;
    `counts` the generated, real and PRES images; `provenance` how the model was trained (it wins over what
    the export's dreambooth.json says)."""
    export_info = read_export_info(pipeline_dir) if pipeline_dir else {}
    generated, real, pres = counts["generated"], counts["real"], counts["pres"]
    return {
        # no dreambooth.json: not fine-tuned
        "method": export_info.get("method", "dreambooth") if export_info else "base",
        "model": Path(str(export_info.get("base_model", ""))).name or None,
        "prior_enabled": None,
        "prior_weight": None,
        "seed": None,
        "tags": [],
        "steps": export_info.get("steps"),
        "base_model": export_info.get("base_model"),
        **(provenance or {}),
        **names,
        "class_noun_condition": class_noun_condition(names["class_noun"], names["instance_class_noun"]),
        "pipeline": str(Path(pipeline_dir).resolve()) if pipeline_dir else None,
        "real_images_dir": str(Path(real_images_dir).resolve()),
        "prompt_set": prompt_set,
        "eval_seed": cfg.seed,
        "pres_seed": cfg.pres.seed,
        "pres_prompt": pres_jobs[0].prompt if pres_jobs else None,
        "num_prompts": len(prompts),
        "images_per_prompt": cfg.images_per_prompt,
        "num_generated": generated,
        "num_real": real,
        "num_pres": pres,
        "pairs": {
            "dino": generated * real,
            "clip_i": generated * real,
            "clip_t": generated,
            "pres": pres * real,
            "div": len(prompts) * math.comb(cfg.images_per_prompt, 2),
            "real": math.comb(real, 2),
        },
        "dino_model": model_location(cfg.dino.model),
        "clip_model": model_location(cfg.clip.model),
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
    }


def write_record(
    eval_dir: Path, scores: dict, metadata: dict, pres_jobs: list[ImageJob], grids: list[str]
) -> tuple[dict, Path]:
    """`scores`: `metrics`, `div_backend`, `per_prompt` and `images` (the rows of `score`); `grids` the grid
    names (`<name>.png` in `eval_dir`). Returns the record and its file."""
    record = {
        "metrics": scores["metrics"],
        "div_backend": scores["div_backend"],
        "metadata": metadata,
        "per_prompt": scores["per_prompt"],
        "images": scores["images"],
        "pres_images": [{"file": f"{EVAL_IMAGES}/{j.file}", "prompt": j.prompt, "seed": j.seed} for j in pres_jobs],
        "grids": {name: f"{name}.png" for name in grids},
    }
    return record, write_json_atomically(record, eval_dir / METRICS_FILE)


def retire_eval(output_dir: str | os.PathLike) -> Path | None:
    """Before a run folder gets a new export: its `eval/` scored the model being replaced, so it moves to
    `eval_history/<n>/` (kept, out of the report's sight) rather than stand beside the new model."""
    eval_dir, history = Path(output_dir) / EVAL_DIR, Path(output_dir) / EVAL_HISTORY
    if not eval_dir.is_dir():
        return None
    history.mkdir(exist_ok=True)
    target = history / str(len(list(history.iterdir())))
    os.replace(eval_dir, target)
    log.info("The earlier model's evaluation moved to %s", target)
    return target
