"""The paper's evaluation of one trained subject (Ruiz et al. 2023, sec. 4.1 and Table 3).

Render the DreamBooth dataset's 25 prompts for the subject with fixed seeds, then score subject
fidelity (DINO, CLIP-I against the real photos), prompt fidelity (CLIP-T), prior preservation (PRES:
DINO between the model's images of the bare class and the real subject; lower is better) and
diversity (DIV: distance between images of the same prompt). Results go to `<output_dir>/eval/`.

Training calls `evaluate_run` after export when `eval.enabled` is true; on its own:
`python -m dreambooth_pl.evaluate run_dir=<training run>` or `pipeline=<exported folder>`, or a base model
with `pipeline=<folder> subject=<name> identifier=sks`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from diffusers import DiffusionPipeline
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from dreambooth_pl.util.config import ConfigError, non_finite
from dreambooth_pl.evaluation.protocol import EvalPrompt, read_class_table, read_prompt_lists, subject_prompts
from dreambooth_pl.runs.export import read_run_info
from dreambooth_pl.runs.files import ProcessLock, atomic_file
from dreambooth_pl.util.images import image_grid, is_readable_image, list_images, load_rgb, save_atomically
from dreambooth_pl.runs.loggers import close_loggers
from dreambooth_pl.runs.records import saved_run_config
from dreambooth_pl.evaluation.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    Diversity,
    Preprocess,
    SubjectFidelity,
    TextAlignment,
    choose_div_backend,
    cosine_distance,
    lpips_distance,
    lpips_input,
    self_similarity,
    vae_feature_distance,
)
from dreambooth_pl.models.hub import model_fingerprint, require_reachable
from dreambooth_pl.models.pipelines import loaded_pipeline
from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.models.sampling import SamplerSettings, render

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
# Image i of prompt p uses seed + SEED_STRIDE * p + i: asking for more images per prompt later keeps the
# earlier ones (and their files) valid.
SEED_STRIDE = 1000
METRIC_NAMES = ("dino", "clip_i", "clip_t", "pres", "div", "real_dino", "real_clip_i")


@dataclasses.dataclass(frozen=True)
class ImageJob:
    file: str
    prompt: str
    seed: int
    prompt_index: int | None = None  # None for PRES images


def class_noun_condition(class_noun: str, instance_class_noun: str) -> str:
    """The class-noun ablation's row (paper Table 4): the noun in the instance prompt vs the real class."""
    if not instance_class_noun.strip():
        return "none"
    return "correct" if instance_class_noun.strip() == class_noun.strip() else "wrong"


def run_meta_from_config(cfg: DictConfig) -> dict:
    """How a run was trained, as the report groups runs: pass this as `run_meta` from a training config.

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


def _write_json_atomically(data: dict, path: Path) -> Path:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2)
    return path


def model_location(name: str) -> str:
    """A local model folder as an absolute path, a hub id as given: the report finds the readers table
    beside the DINO model (`report.unvalidated_columns`) from whatever folder it runs in."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def _number(value) -> float | None:
    """JSON has no NaN: a metric that is undefined (DIV with one image per prompt) is null."""
    value = float(value)
    return value if math.isfinite(value) else None


def plan_images(prompts: list[EvalPrompt], cfg: DictConfig, class_noun: str) -> tuple[list[ImageJob], list[ImageJob]]:
    """Every image the protocol needs, with its file name and seed: the subject prompts, then PRES."""
    per_prompt = cfg.images_per_prompt
    subject = [
        ImageJob(f"p{p.index:02d}_{i:02d}.png", p.text, cfg.seed + SEED_STRIDE * p.index + i, p.index)
        for p in prompts
        for i in range(per_prompt)
    ]
    pres_prompt = fill_prompt(cfg.pres.prompt, class_noun=class_noun)
    pres = [ImageJob(f"pres_{i:03d}.png", pres_prompt, cfg.pres.seed + i) for i in range(cfg.pres.num_images)]
    return subject, pres


def generate_missing(
    pipeline_dir: str,
    jobs: list[ImageJob],
    images_dir: Path,
    sampler: dict,
    device: str | None = None,
    dtype: str | None = None,
    pipe: DiffusionPipeline | None = None,
) -> int:
    """Render the images that are not on disk yet (or were made with other settings); return how many.

    `manifest.json` records the model and sampler each file was made with, so a rerun reuses finished
    images, a killed run resumes, and a changed model or sampler never reuses stale pictures. The model is
    recorded by its contents (a retrain into the same folder changes its weight files), not only its path;
    a LoRA or Textual Inversion folder's own files are enough, as its dreambooth.json names the base model.
    `pipe`: `pipeline_dir` already loaded on `device` in `dtype` (training's final samples share it).
    """
    model = {
        "pipeline": str(Path(pipeline_dir).resolve()),
        "fingerprint": model_fingerprint(pipeline_dir),
        "run_info": read_run_info(pipeline_dir),
    }
    images_dir.mkdir(parents=True, exist_ok=True)
    # One process renders into a folder at a time; another evaluation of the same run waits, then reuses.
    with ProcessLock(images_dir / LOCK_FILE, "the evaluation images"):
        setting = {key: value for key, value in sampler.items() if key != "batch_size"}  # batching: rounding only
        manifest_path = images_dir / MANIFEST
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        same_model = old.get("model") == model and old.get("sampler") == setting
        known = old.get("images", {}) if same_model else {}
        wanted = {job.file: {"prompt": job.prompt, "seed": job.seed} for job in jobs}
        todo = [
            job
            for job in jobs
            if known.get(job.file) != wanted[job.file] or not is_readable_image(images_dir / job.file)
        ]
        log.info(
            "Eval images: %d of %d on disk, %d to generate in %s",
            len(jobs) - len(todo),
            len(jobs),
            len(todo),
            images_dir,
        )
        for stale in [*images_dir.glob(".*.png"), *(images_dir / job.file for job in todo)]:
            stale.unlink(missing_ok=True)  # before the manifest names the new settings, so no stale file passes
        _write_json_atomically({"model": model, "sampler": setting, "images": {**known, **wanted}}, manifest_path)
        if not todo:
            return 0
        with nullcontext(pipe) if pipe is not None else loaded_pipeline(pipeline_dir, device, dtype) as pipe:
            # the size the pipeline renders when none is given (FLUX's and SD3's keep it as default_sample_size)
            sample_size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
            native = sample_size * pipe.vae_scale_factor
            settings = SamplerSettings(**{**sampler, "resolution": sampler["resolution"] or native})
            for index, image in render(
                pipe, [j.prompt for j in todo], [j.seed for j in todo], settings, desc="eval images"
            ):
                save_atomically(image, images_dir / todo[index].file)
        return len(todo)


def draw_images(draw: Callable[[str, int], Image.Image], jobs: list[ImageJob], images_dir: Path) -> int:
    """Every job's image from `draw` (cheap: nothing is reused, and no model manifest applies)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / MANIFEST).unlink(missing_ok=True)
    for job in jobs:
        save_atomically(draw(job.prompt, job.seed), images_dir / job.file)
    return len(jobs)


def _grid(images: list[Image.Image], cols: int | None, cell: int) -> Image.Image:
    """Cells of at most `cell` pixels: 100 images at 512 px would make a grid too big to look at or log."""
    return image_grid(
        [im if im.width <= cell else im.resize((cell, cell), Image.Resampling.LANCZOS) for im in images], cols
    )


def check_eval_config(cfg: DictConfig) -> None:
    """Every number of the evaluation, checked before anything is rendered (train.py: before training)."""
    problems = non_finite(cfg, "eval")
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        problems.append(f"eval.num_prompts={cfg.num_prompts} must be >= 1 (or null for all 25)")
    if not 1 <= cfg.images_per_prompt <= SEED_STRIDE:
        problems.append(f"eval.images_per_prompt={cfg.images_per_prompt} must be between 1 and {SEED_STRIDE}")
    elif cfg.images_per_prompt < 2 and cfg.div.enabled:
        problems.append(
            f"eval.images_per_prompt={cfg.images_per_prompt}: DIV compares images of one prompt and needs at "
            "least 2 (the paper uses 4); or set eval.div.enabled=false"
        )
    if cfg.pres.num_images < 0:
        problems.append(f"eval.pres.num_images={cfg.pres.num_images} must be >= 0 (0: no PRES)")
    resolution = cfg.sampler.resolution
    if resolution is not None and (resolution < 8 or resolution % 8):
        problems.append(f"eval.sampler.resolution={resolution} must be a positive multiple of 8 (or null)")
    for option in ("sampler.num_inference_steps", "sampler.batch_size", "embed_batch_size", "grid_cell_size"):
        if OmegaConf.select(cfg, option) < 1:
            problems.append(f"eval.{option}={OmegaConf.select(cfg, option)} must be >= 1")
    for option in ("seed", "pres.seed"):
        if not 0 <= OmegaConf.select(cfg, option) < 2**32:
            problems.append(f"eval.{option}={OmegaConf.select(cfg, option)} must be between 0 and 2**32 - 1")
    if problems:
        raise ConfigError("Invalid eval config:\n  " + "\n  ".join(problems))
    read_prompt_lists(cfg.prompts_file)  # a missing or foreign prompts file, named now
    if cfg.real_images_dir:
        list_images(cfg.real_images_dir, option="eval.real_images_dir")  # a missing or empty folder, named now


def evaluate_run(
    pipeline_dir: str | None,
    output_dir: str,
    eval_cfg: DictConfig | dict,
    real_images_dir: str,
    subject: str,
    class_noun: str,
    identifier: str,
    instance_class_noun: str | None = None,
    run_meta: dict | None = None,
    loggers: list[Logger] | None = None,
    draw: Callable[[str, int], Image.Image] | None = None,
    pipe: DiffusionPipeline | None = None,
) -> dict:
    """Generate (or reuse) the evaluation images, score them, write `<output_dir>/eval/metrics.json`.

    `class_noun` is the subject's real class (it picks the live/object prompt list and the PRES prompt);
    `instance_class_noun` is the noun the instance prompt used, which fills the prompts (default: the same).
    `run_meta` says how the model was trained (see `run_meta_from_config`); it is stored for the report.
    Summary metrics go to each logger; a W&B logger also gets a table of every image with its scores.
    `draw(prompt, seed)`, when given, makes the images instead of a model (`pipeline_dir` None): the toy
    renderer's ground truth, a control row. `pipe`: `pipeline_dir` already loaded (see `generate_missing`).
    Returns the metrics with `eval_dir`, `metrics_file` and `generated` (images rendered this time).
    """
    cfg = eval_cfg if isinstance(eval_cfg, DictConfig) else OmegaConf.create(eval_cfg)
    check_eval_config(cfg)
    noun = class_noun if instance_class_noun is None else instance_class_noun
    prompt_set, prompts = subject_prompts(
        cfg.prompts_file, class_noun, identifier, noun, list(cfg.live_classes), cfg.num_prompts
    )
    jobs, pres_jobs = plan_images(prompts, cfg, class_noun)
    eval_dir = Path(output_dir) / "eval"
    images_dir = eval_dir / "images"
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    # everything that can fail fast (photos, embedding models, LPIPS) before minutes of generation
    real = [load_rgb(p) for p in list_images(real_images_dir, option="eval.real_images_dir")]
    require_reachable(cfg.dino.model, "eval.dino.model")
    require_reachable(cfg.clip.model, "eval.clip.model")
    dino = DinoEmbedder(cfg.dino.model, Preprocess(**_preprocess(cfg.dino)), cfg.embed_batch_size, cfg.device)
    clip = ClipEmbedder(cfg.clip.model, Preprocess(**_preprocess(cfg.clip)), cfg.embed_batch_size, cfg.device)
    div_backend = choose_div_backend(cfg.div.backend) if cfg.div.enabled else None
    distance = {
        "lpips": lambda: lpips_distance(cfg.div.lpips_net, cfg.device),
        "vae": lambda: vae_feature_distance(cfg.div.vae, cfg.device),
    }.get(div_backend, lambda: cosine_distance)()

    if draw is None:
        generated = generate_missing(pipeline_dir, jobs + pres_jobs, images_dir, sampler, cfg.device, cfg.dtype, pipe)
    else:
        generated = draw_images(draw, jobs + pres_jobs, images_dir)
    images = [load_rgb(images_dir / j.file) for j in jobs]
    pres_images = [load_rgb(images_dir / j.file) for j in pres_jobs]

    log.info("Scoring %d images against %d real photos", len(images), len(real))
    metrics, image_rows, per_prompt = _score(
        prompts, jobs, images, pres_images, real, dino, clip, distance, div_backend
    )

    run_info = read_run_info(pipeline_dir) if pipeline_dir else {}
    metadata = {
        "method": run_info.get("method", "dreambooth") if run_info else "base",  # no dreambooth.json: not fine-tuned
        "model": Path(str(run_info.get("base_model", ""))).name or None,
        "prior_enabled": None,
        "prior_weight": None,
        "seed": None,
        "tags": [],
        "steps": run_info.get("steps"),
        "base_model": run_info.get("base_model"),
        **(run_meta or {}),
        "subject": subject,
        "identifier": identifier,
        "class_noun": class_noun,
        "instance_class_noun": noun,
        "class_noun_condition": class_noun_condition(class_noun, noun),
        "pipeline": str(Path(pipeline_dir).resolve()) if pipeline_dir else None,
        "real_images_dir": str(Path(real_images_dir).resolve()),
        "prompt_set": prompt_set,
        "eval_seed": cfg.seed,
        "pres_seed": cfg.pres.seed,
        "pres_prompt": pres_jobs[0].prompt if pres_jobs else None,
        "num_prompts": len(prompts),
        "images_per_prompt": cfg.images_per_prompt,
        "num_generated": len(images),
        "num_real": len(real),
        "num_pres": len(pres_images),
        "pairs": {
            "dino": len(images) * len(real),
            "clip_i": len(images) * len(real),
            "clip_t": len(images),
            "pres": len(pres_images) * len(real),
            "div": len(prompts) * math.comb(cfg.images_per_prompt, 2),
            "real": math.comb(len(real), 2),
        },
        "dino_model": model_location(cfg.dino.model),
        "clip_model": model_location(cfg.clip.model),
        "sampler": sampler,
    }
    grids = {"grid": _grid(images, cfg.images_per_prompt, cfg.grid_cell_size)}  # a row per prompt
    if pres_images:
        grids["pres_grid"] = _grid(pres_images, None, cfg.grid_cell_size)
    for name, grid in grids.items():
        save_atomically(grid, eval_dir / f"{name}.png")
    record = {
        "metrics": metrics,
        "div_backend": div_backend,
        "metadata": metadata,
        "per_prompt": per_prompt,
        "images": image_rows,
        "pres_images": [{"file": f"images/{j.file}", "prompt": j.prompt, "seed": j.seed} for j in pres_jobs],
        "grids": {name: f"{name}.png" for name in grids},
    }
    metrics_file = _write_json_atomically(record, eval_dir / METRICS_FILE)
    log.info(
        "Eval of %s: %s (DIV backend %s); wrote %s",
        subject,
        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None),
        div_backend,
        metrics_file,
    )
    _log_to(loggers or [], record, images, grids, metadata.get("steps"))
    return {"eval_dir": str(eval_dir), "metrics_file": str(metrics_file), "generated": generated, **metrics}


def _score(
    prompts: list[EvalPrompt],
    jobs: list[ImageJob],
    images: list[Image.Image],
    pres_images: list[Image.Image],
    real: list[Image.Image],
    dino: DinoEmbedder,
    clip: ClipEmbedder,
    distance: Callable[[Tensor, Tensor], Tensor],
    div_backend: str,
) -> tuple[dict, list[dict], list[dict]]:
    """The summary metrics, one row per image and one per prompt."""
    per_prompt_images = len(jobs) // len(prompts)
    real_dino, image_dino = dino.images(real), dino.images(images)
    real_clip, image_clip = clip.images(real), clip.images(images)
    text_clip = clip.texts([p.clip_text for p in prompts])
    position = {p.index: k for k, p in enumerate(prompts)}

    fidelity_dino, fidelity_clip, alignment = SubjectFidelity(real_dino), SubjectFidelity(real_clip), TextAlignment()
    fidelity_dino.update(image_dino)
    fidelity_clip.update(image_clip)
    alignment.update(image_clip, text_clip[[position[j.prompt_index] for j in jobs]])
    pres = SubjectFidelity(real_dino)
    if pres_images:
        pres.update(dino.images(pres_images))

    div_inputs = lpips_input(images) if div_backend in ("lpips", "vae") else image_dino
    diversity = Diversity(distance)
    for p in prompts if div_backend else []:
        diversity.update(div_inputs[[k for k, j in enumerate(jobs) if j.prompt_index == p.index]])

    metrics = {
        "dino": _number(fidelity_dino.compute()),
        "clip_i": _number(fidelity_clip.compute()),
        "clip_t": _number(alignment.compute()),
        "pres": _number(pres.compute()),
        "div": _number(diversity.compute()) if div_backend else None,
        "real_dino": _number(self_similarity(real_dino)),
        "real_clip_i": _number(self_similarity(real_clip)),
    }
    scores = {
        "dino": fidelity_dino.per_item().tolist(),
        "clip_i": fidelity_clip.per_item().tolist(),
        "clip_t": alignment.per_item().tolist(),
    }
    image_rows = [
        {
            "file": f"images/{j.file}",
            "prompt_index": j.prompt_index,
            "image_index": k % per_prompt_images,
            "prompt": j.prompt,
            "seed": j.seed,
            **{name: values[k] for name, values in scores.items()},
        }
        for k, j in enumerate(jobs)
    ]
    per_div = diversity.per_item().tolist() if div_backend else []
    per_prompt = [
        {
            "index": p.index,
            "prompt": p.text,
            "clip_text": p.clip_text,
            **{
                name: sum(r[name] for r in image_rows if r["prompt_index"] == p.index) / per_prompt_images
                for name in scores
            },
            "div": per_div[k] if per_div else None,
        }
        for k, p in enumerate(prompts)
    ]

    return metrics, image_rows, per_prompt


def _preprocess(node: DictConfig) -> dict:
    return {key: node[key] for key in ("resize", "crop", "mean", "std")}


def _log_to(
    loggers: list[Logger], record: dict, images: list[Image.Image], grids: dict[str, Image.Image], step: int | None
) -> None:
    summary = {f"eval/{name}": value for name, value in record["metrics"].items() if value is not None}
    for logger in loggers:
        logger.log_metrics(summary, step=step)
        if isinstance(logger, WandbLogger):
            import wandb

            columns = ["prompt", "image", "seed", "dino", "clip_i", "clip_t"]
            rows = [
                [r["prompt"], wandb.Image(image), r["seed"], r["dino"], r["clip_i"], r["clip_t"]]
                for r, image in zip(record["images"], images)
            ]
            logger.log_table("eval/images", columns=columns, data=rows, step=step)
            for name, grid in grids.items():  # a key per grid: images of one key must share a size in W&B
                logger.log_image(f"eval/{name}", [grid], step=step)
            logger.experiment.summary.update(summary)  # the runs table and parallel coordinates compare these
        logger.save()


def retire_eval(output_dir: str | os.PathLike) -> Path | None:
    """Before a run folder gets a new export: its `eval/` scored the model being replaced, so it moves to
    `eval_history/<n>/` (kept, out of the report's sight) rather than stand beside the new model."""
    eval_dir, history = Path(output_dir) / "eval", Path(output_dir) / "eval_history"
    if not eval_dir.is_dir():
        return None
    history.mkdir(exist_ok=True)
    target = history / str(len(list(history.iterdir())))
    os.replace(eval_dir, target)
    log.info("The earlier model's evaluation moved to %s", target)
    return target


def find_export(run_dir: str | os.PathLike) -> Path:
    """The exported model of a training run: the subfolder holding dreambooth.json (pipeline/ when several)."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r}: no such folder.")
    exports = sorted(path.parent for path in Path(run_dir).glob("*/dreambooth.json"))
    named = [p for p in exports if p.name == "pipeline"]
    if len(named) == 1 or len(exports) == 1:
        return (named or exports)[0]
    found = ", ".join(p.name for p in exports) or "none"
    raise ConfigError(f"run_dir={str(run_dir)!r}: expected one exported folder with dreambooth.json, found {found}.")


def evaluate_from_config(cfg: DictConfig) -> dict:
    """The standalone job: resolve the export, the subject and the real photos, then `evaluate_run`."""
    if not (cfg.run_dir or cfg.pipeline):
        raise ConfigError("Set run_dir=<training run folder> or pipeline=<exported model folder>.")
    check_eval_config(cfg.eval)
    if cfg.pipeline and not Path(cfg.pipeline).is_dir():
        raise ConfigError(f"pipeline={cfg.pipeline!r}: no such folder.")
    pipeline = Path(cfg.pipeline) if cfg.pipeline else find_export(cfg.run_dir)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else pipeline.parent
    info = read_run_info(pipeline)
    saved = saved_run_config(run_dir)
    run_meta = run_meta_from_config(saved) if saved is not None else {}
    run_meta.update(OmegaConf.to_container(cfg.run_meta, resolve=True))

    def pick(option: str, *candidates):
        value = next((c for c in candidates if c is not None), None)
        if value is None:
            raise ConfigError(f"{option} is not in {pipeline / 'dreambooth.json'}: pass {option}=...")
        return str(value)

    def chosen(key: str):  # what the command line's subject=/identifier= groups set
        return OmegaConf.select(cfg, key, default=None)

    subject = pick("subject", chosen("subject.name"), info.get("subject"))
    identifier = pick("identifier", chosen("identifier.token"), info.get("identifier"))
    saved_class = OmegaConf.select(saved, "subject.class_noun", throw_on_resolution_failure=False) if saved else None
    table = read_class_table(cfg.eval.prompts_file)
    candidates = (chosen("subject.class_noun"), saved_class, table.get(subject), info.get("class_noun"))
    class_noun = pick("subject.class_noun", *candidates)
    noun = pick("instance_class_noun", cfg.instance_class_noun, info.get("class_noun"), class_noun)
    # the photos the run was scored against, else trained on (dreambooth.json), else the dataset's folder
    dataset_photos = str(Path(cfg.paths.dreambooth_root) / "dataset" / subject)
    recorded = (info.get("real_images_dir"), info.get("instance_dir"))
    photos = (cfg.eval.real_images_dir, chosen("subject.instance_dir"), *recorded, dataset_photos)
    real_images_dir = next(p for p in photos if p)

    # the training run's W&B run gets the evaluation (same id); a run without one gets a new eval run. The
    # logger is this command's (conf/evaluate.yaml): nothing read from the run folder is instantiated
    loggers = [instantiate(cfg.logger.wandb, save_dir=str(run_dir))] if cfg.logger.wandb else []
    succeeded = False
    try:
        result = evaluate_run(
            str(pipeline),
            str(cfg.output_dir or run_dir),
            cfg.eval,
            real_images_dir,
            subject,
            class_noun,
            identifier,
            instance_class_noun=noun,
            run_meta=run_meta,
            loggers=loggers,
        )
        succeeded = True
    finally:
        close_loggers(loggers, succeeded)
    return result


def with_run_model(cfg: DictConfig) -> DictConfig:
    """The config composed again with the training run's `model=`, whose file sets the evaluation defaults as
    in train.py (model=toy: eval=toy). An `eval=` that the run's model would not pick is refused, naming it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    run_dir = cfg.run_dir or (cfg.pipeline and Path(cfg.pipeline).parent)
    saved = saved_run_config(run_dir) if run_dir else None
    model = OmegaConf.select(saved, "model.name", default=None) if saved is not None else None
    overrides = list(HydraConfig.get().overrides.task)
    groups = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    known = GlobalHydra.instance().config_loader().get_group_options("model")
    if model not in known or "model" in groups:  # a model without a config file: its evaluation is eval=
        return cfg
    asked = groups.get("eval")
    if asked is not None:
        others = [o for o in overrides if o != asked]
        picked = compose("evaluate", [*others, f"model={model}"], return_hydra_config=True).hydra.runtime.choices.eval
        if asked.split("=", 1)[1] != picked:
            raise ConfigError(
                f"{asked}: the run in {run_dir} was trained with model={model}, which is evaluated with "
                f"eval={picked}; drop {asked} (or pass model= to evaluate it as another model)."
            )
    return compose("evaluate", [*overrides, f"model={model}"])

