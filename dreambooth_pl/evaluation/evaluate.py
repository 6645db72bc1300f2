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
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from diffusers import DiffusionPipeline
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from dreambooth_pl.checks import check_eval_config
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
from dreambooth_pl.evaluation.protocol import EvalPrompt, read_class_table, subject_prompts
from dreambooth_pl.evaluation.record import eval_metadata, provenance_from_config, write_record
from dreambooth_pl.evaluation.render import (
    ImageJob,
    ImageProducer,
    generate_missing,
    plan_images,
    produce_images,
    save_grids,
)
from dreambooth_pl.models.hub import require_reachable
from dreambooth_pl.runs.export import read_export_info
from dreambooth_pl.runs.layout import EVAL_DIR, EVAL_IMAGES, EXPORT_INFO, PIPELINE, REWRITTEN, WANDB_DIR, exports
from dreambooth_pl.runs.loggers import close_loggers
from dreambooth_pl.runs.records import saved_run_config
from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.files import check_writable
from dreambooth_pl.util.images import list_images, load_rgb
from dreambooth_pl.util.threads import use_cpu_threads

log = logging.getLogger(__name__)


def evaluate_run(
    pipeline_dir: str | None,
    output_dir: str,
    eval_cfg: DictConfig | dict,
    real_images_dir: str,
    subject: str,
    class_noun: str,
    identifier: str,
    instance_class_noun: str | None = None,
    provenance: dict | None = None,
    loggers: list[Logger] | None = None,
    producer: ImageProducer | None = None,
    pipe: DiffusionPipeline | None = None,
) -> dict:
    """Generate (or reuse) the evaluation images, score them, write `<output_dir>/eval/metrics.json`.

    `class_noun` is the subject's real class (it picks the live/object prompt list and the PRES prompt);
    `instance_class_noun` is the noun the instance prompt used, which fills the prompts (default: the same).
    `provenance` says how the model was trained (see `provenance_from_config`); it is stored for the report.
    Summary metrics go to each logger; a W&B logger also gets a table of every image with its scores.
    `producer`, when given, makes the images instead of a model (`pipeline_dir` None): a world's control row
    (render.ImageProducer). `pipe`: `pipeline_dir` already loaded (see `generate_missing`).
    Returns the metrics with `eval_dir`, `metrics_file` and `generated` (images rendered this time).
    """
    cfg = eval_cfg if isinstance(eval_cfg, DictConfig) else OmegaConf.create(eval_cfg)
    check_eval_config(cfg)
    noun = class_noun if instance_class_noun is None else instance_class_noun
    prompt_set, prompts = subject_prompts(
        cfg.prompts_file, class_noun, identifier, noun, list(cfg.live_classes), cfg.num_prompts
    )
    jobs, pres_jobs = plan_images(prompts, cfg, class_noun)
    eval_dir = Path(output_dir) / EVAL_DIR
    images_dir = eval_dir / EVAL_IMAGES
    # everything that can fail fast (photos, embedding models, LPIPS) before minutes of generation
    real = [load_rgb(p) for p in list_images(real_images_dir, option="eval.real_images_dir")]
    scorers = load_scorers(cfg)

    if producer is None:
        sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
        generated = generate_missing(pipeline_dir, jobs + pres_jobs, images_dir, sampler, cfg.device, cfg.dtype, pipe)
    else:
        generated = produce_images(producer, jobs + pres_jobs, images_dir)
    images = [load_rgb(images_dir / j.file) for j in jobs]
    pres_images = [load_rgb(images_dir / j.file) for j in pres_jobs]

    log.info("Scoring %d images against %d real photos", len(images), len(real))
    scores = score(prompts, jobs, images, pres_images, real, scorers)
    names = {"subject": subject, "identifier": identifier, "class_noun": class_noun, "instance_class_noun": noun}
    counts = {"generated": len(images), "real": len(real), "pres": len(pres_images)}
    metadata = eval_metadata(
        cfg, pipeline_dir, provenance, names, real_images_dir, prompt_set, prompts, pres_jobs, counts
    )
    grids = save_grids(eval_dir, images, pres_images, cfg.images_per_prompt, cfg.grid_cell_size)
    record, metrics_file = write_record(eval_dir, scores, metadata, pres_jobs, list(grids))
    metrics = scores["metrics"]
    log.info(
        "Eval of %s: %s (DIV backend %s); wrote %s",
        subject,
        ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None),
        scores["div_backend"],
        metrics_file,
    )
    _log_to(loggers or [], record, images, grids, metadata.get("steps"))
    return {"eval_dir": str(eval_dir), "metrics_file": str(metrics_file), "generated": generated, **metrics}


@dataclasses.dataclass
class Scorers:
    """The embedding models and the DIV distance (`div_backend` None: DIV off)."""

    dino: DinoEmbedder
    clip: ClipEmbedder
    div_backend: str | None
    distance: Callable[[Tensor, Tensor], Tensor]


def load_scorers(cfg: DictConfig) -> Scorers:
    """The models that score, loaded (or refused, naming the option) before any image is rendered."""
    dino, clip = load_readers(cfg)
    div_backend = choose_div_backend(cfg.div.backend) if cfg.div.enabled else None
    distance = {
        "lpips": lambda: lpips_distance(cfg.div.lpips_net, cfg.device),
        "vae": lambda: vae_feature_distance(cfg.div.vae, cfg.device),
    }.get(div_backend, lambda: cosine_distance)()
    return Scorers(dino, clip, div_backend, distance)


def load_readers(cfg: DictConfig, group: str = "eval") -> tuple[DinoEmbedder, ClipEmbedder]:
    """The DINO and CLIP readers of an `eval` (or `validation`) config, refused by option name when missing."""
    require_reachable(cfg.dino.model, f"{group}.dino.model")
    require_reachable(cfg.clip.model, f"{group}.clip.model")

    def preprocess(node: DictConfig) -> Preprocess:
        return Preprocess(**{key: node[key] for key in ("resize", "crop", "mean", "std")})

    dino = DinoEmbedder(cfg.dino.model, preprocess(cfg.dino), cfg.embed_batch_size, cfg.device, f"{group}.dino.model")
    clip = ClipEmbedder(cfg.clip.model, preprocess(cfg.clip), cfg.embed_batch_size, cfg.device, f"{group}.clip.model")
    return dino, clip


def score(
    prompts: list[EvalPrompt],
    jobs: list[ImageJob],
    images: list[Image.Image],
    pres_images: list[Image.Image],
    real: list[Image.Image],
    scorers: Scorers,
) -> dict:
    """The summary `metrics`, the `div_backend`, one row per image (`images`) and one per prompt (`per_prompt`)."""
    dino, clip, div_backend = scorers.dino, scorers.clip, scorers.div_backend
    real_dino, image_dino = dino.images(real), dino.images(images)
    real_clip, image_clip = clip.images(real), clip.images(images)
    text_clip = clip.texts([p.clip_text for p in prompts])
    position = {p.index: k for k, p in enumerate(prompts)}

    # Every image is on this process (rank 0 under DDP, which validates and evaluates alone): a sync across
    # processes would wait for ranks that hold no images, forever.
    local = {"sync_on_compute": False}
    fidelity_dino, fidelity_clip = SubjectFidelity(real_dino, **local), SubjectFidelity(real_clip, **local)
    alignment = TextAlignment(**local)
    fidelity_dino.update(image_dino)
    fidelity_clip.update(image_clip)
    alignment.update(image_clip, text_clip[[position[j.prompt_index] for j in jobs]])
    pres = SubjectFidelity(real_dino, **local)
    if pres_images:
        pres.update(dino.images(pres_images))

    div_inputs = lpips_input(images) if div_backend in ("lpips", "vae") else image_dino
    diversity = Diversity(scorers.distance, **local)
    for p in prompts if div_backend else []:
        diversity.update(div_inputs[[k for k, j in enumerate(jobs) if j.prompt_index == p.index]])

    metrics = {
        "dino": _number(fidelity_dino.compute()),
        "clip_i": _number(fidelity_clip.compute()),
        "clip_t": _number(alignment.compute()),
        "pres": _number(pres.compute()) if pres_images else None,
        "div": _number(diversity.compute()) if div_backend else None,
        "real_dino": _number(self_similarity(real_dino)),
        "real_clip_i": _number(self_similarity(real_clip)),
    }
    per_image = {
        "dino": fidelity_dino.per_item().tolist(),
        "clip_i": fidelity_clip.per_item().tolist(),
        "clip_t": alignment.per_item().tolist(),
    }
    per_div = diversity.per_item().tolist() if div_backend else []
    image_rows, per_prompt = _rows(prompts, jobs, per_image, per_div)
    return {"metrics": metrics, "div_backend": div_backend, "images": image_rows, "per_prompt": per_prompt}


def _rows(
    prompts: list[EvalPrompt], jobs: list[ImageJob], per_image: dict[str, list[float]], per_div: list[float]
) -> tuple[list[dict], list[dict]]:
    """A row per image with its scores, and a row per prompt with their means and the prompt's DIV."""
    per_prompt_images = len(jobs) // len(prompts)
    image_rows = [
        {
            "file": f"{EVAL_IMAGES}/{j.file}",
            "prompt_index": j.prompt_index,
            "image_index": k % per_prompt_images,
            "prompt": j.prompt,
            "seed": j.seed,
            **{name: values[k] for name, values in per_image.items()},
        }
        for k, j in enumerate(jobs)
    ]
    per_prompt = [
        {
            "index": p.index,
            "prompt": p.text,
            "clip_text": p.clip_text,
            **{
                name: sum(r[name] for r in image_rows if r["prompt_index"] == p.index) / per_prompt_images
                for name in per_image
            },
            "div": per_div[k] if per_div else None,
        }
        for k, p in enumerate(prompts)
    ]
    return image_rows, per_prompt


def _number(value) -> float | None:
    """JSON has no NaN: a metric that is undefined (DIV with one image per prompt) is null."""
    value = float(value)
    return value if math.isfinite(value) else None


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


def find_export(run_dir: str | os.PathLike) -> Path:
    """The exported model of a training run: the subfolder holding dreambooth.json (pipeline/ when several)."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r}: no such folder.")
    found = exports(run_dir)
    named = [p for p in found if p.name == PIPELINE]
    if len(named) == 1 or len(found) == 1:
        return (named or found)[0]
    names = ", ".join(p.name for p in found) or "none"
    raise ConfigError(f"run_dir={str(run_dir)!r}: expected one exported folder with {EXPORT_INFO}, found {names}.")


def evaluate_from_config(cfg: DictConfig) -> dict:
    """The standalone job: resolve the export, the subject and the real photos, then `evaluate_run`."""
    use_cpu_threads(cfg.cpu_threads, cfg.eval.device)
    if not (cfg.run_dir or cfg.pipeline):
        raise ConfigError("Set run_dir=<training run folder> or pipeline=<exported model folder>.")
    if cfg.pipeline and not Path(cfg.pipeline).is_dir():
        raise ConfigError(f"pipeline={cfg.pipeline!r}: no such folder.")
    pipeline = Path(cfg.pipeline) if cfg.pipeline else find_export(cfg.run_dir)
    check_eval_config(cfg.eval)  # after the folder: a missing run is named before the options around it
    run_dir = Path(cfg.run_dir) if cfg.run_dir else pipeline.parent
    check_writable(
        cfg.output_dir or run_dir, "The evaluation's folder", "pass output_dir=<a writable folder>", REWRITTEN
    )
    if cfg.logger.wandb:  # the W&B run's files go to the run folder whatever output_dir says
        check_writable(run_dir / WANDB_DIR, "The run's W&B folder", "pass logger.wandb=null")
    info = read_export_info(pipeline)
    saved = saved_run_config(run_dir)
    provenance = provenance_from_config(saved) if saved is not None else {}
    provenance.update(OmegaConf.to_container(cfg.provenance, resolve=True))

    def pick(option: str, *candidates):
        value = next((c for c in candidates if c is not None), None)
        if value is None:
            raise ConfigError(f"{option} is not in {pipeline / EXPORT_INFO}: pass {option}=...")
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
            provenance=provenance,
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
