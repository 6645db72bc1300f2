"""The whole job behind `python train.py`: class images, training, export, final samples."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.checks import check_config, instance_templates, model_checks, prior_active
from dreambooth_pl.evaluation.evaluate import evaluate_run
from dreambooth_pl.evaluation.record import provenance_from_config, retire_eval
from dreambooth_pl.models.hub import require_reachable
from dreambooth_pl.models.pipelines import load_tokenizer, loaded_pipeline
from dreambooth_pl.models.samples import generate
from dreambooth_pl.runs import layout
from dreambooth_pl.runs.checkpoints import check_checkpoint_fits, resolve_ckpt_path
from dreambooth_pl.runs.export import recover_exports
from dreambooth_pl.runs.loggers import close_loggers, wandb_location
from dreambooth_pl.text.identifier import resolve_identifier
from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.training.data import DreamBoothDataModule
from dreambooth_pl.training.methods import FineTuneMethod
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.training.validation import Validation, validation_prompts
from dreambooth_pl.util.config import ConfigError, log_paths, resolve_path
from dreambooth_pl.util.console import one_console_handler
from dreambooth_pl.util.images import list_images
from dreambooth_pl.util.threads import use_cpu_threads

log = logging.getLogger(__name__)


def require_models(cfg: DictConfig, pretrained: str) -> None:
    """Every model the job will load is cached, local or downloadable: checked in seconds, before class images."""
    require_reachable(pretrained, "model.pretrained", cfg.model.revision)
    if cfg.eval.enabled:
        require_reachable(cfg.eval.dino.model, "eval.dino.model")
        require_reachable(cfg.eval.clip.model, "eval.clip.model")
    if cfg.validation.enabled:
        require_reachable(cfg.validation.dino.model, "validation.dino.model")
        require_reachable(cfg.validation.clip.model, "validation.clip.model")


def require_photos(cfg: DictConfig, instance_dir: str) -> None:
    """The subject's photos, found before anything is said about them; a DreamBooth dataset subject whose
    folder is missing says how to get the dataset."""
    root = Path(cfg.paths.dreambooth_root).resolve()
    if not Path(instance_dir).is_dir() and Path(instance_dir).resolve().is_relative_to(root):
        raise ConfigError(
            f"subject.instance_dir={instance_dir!r}: folder does not exist. subject={cfg.subject.name} is from the "
            f"DreamBooth dataset, looked for in paths.dreambooth_root={str(root)!r} ($DREAMBOOTH_ROOT, else "
            f"data/dreambooth in the project): get it with `git clone --depth 1 https://github.com/google/dreambooth "
            f"{root}`, or set DREAMBOOTH_ROOT to a clone."
        )
    list_images(instance_dir)




@dataclass
class TrainingParts:
    """What a training job is built from; `bench` builds the same pieces."""

    pretrained: str
    instance_dir: str
    method: FineTuneMethod
    prompts: dict
    datamodule: DreamBoothDataModule
    module: DreamBoothModule


def build_parts(cfg: DictConfig) -> TrainingParts:
    """Checks, prompts, data and model, in the order that reports bad input before loading weights."""
    check_config(cfg)
    use_cpu_threads(cfg.cpu_threads, cfg.trainer.accelerator)
    instance_dir = resolve_path(cfg.subject.instance_dir)
    require_photos(cfg, instance_dir)
    pretrained = resolve_path(cfg.model.pretrained)
    model_checks(cfg, pretrained, instance_dir)
    require_models(cfg, pretrained)
    tokenizer = load_tokenizer(pretrained, cfg.model.revision)
    method = instantiate(cfg.method)
    identifier = method.prompt_token(resolve_identifier(tokenizer, **cfg.identifier))
    noun = cfg.prompts.instance_class_noun
    instance = [fill_prompt(t, identifier, noun) for t in instance_templates(cfg)]
    prompts = {
        "identifier": identifier,
        "class_noun": noun,
        "instance": instance[0] if isinstance(cfg.prompts.instance, str) else instance,
        "class": fill_prompt(cfg.prompts.prior, class_noun=cfg.subject.class_noun),
        "validation": [fill_prompt(t, identifier, noun) for t in cfg.prompts.validation],
    }
    log.info("Instance prompt %r, class prompt %r", prompts["instance"], prompts["class"])

    with_prior = prior_active(cfg.prior)
    class_dir = cfg.prior.class_dir if with_prior else None
    class_images = instantiate(cfg.prior.cache, pretrained=pretrained) if with_prior and not class_dir else None
    datamodule = instantiate(
        cfg.data,
        instance_dir=instance_dir,
        instance_prompt=prompts["instance"],
        class_prompt=prompts["class"] if with_prior else None,
        num_class_images=cfg.prior.num_images if with_prior else 0,
        class_images=class_images,
        class_dir=class_dir,
        validation_prompts=prompts["validation"],
    )
    module = instantiate(cfg.module, pretrained=pretrained, method=method)
    return TrainingParts(pretrained, instance_dir, method, prompts, datamodule, module)


def train(cfg: DictConfig) -> dict:
    one_console_handler()
    log_paths(cfg.paths.dreambooth_root, cfg.paths.toyworld_dir, cfg.paths.cache_dir, cfg.paths.log_dir)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = str(layout.checkpoint_dir(cfg, output_dir))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir, output_dir)
    if rank_zero_only.rank == 0:
        recover_exports(output_dir)
    parts = build_parts(cfg)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    succeeded = False
    try:
        result = fit_and_export(cfg, parts, loggers, ckpt_path)
        succeeded = True
    finally:
        close_loggers(loggers, succeeded)  # every job of a sweep ends its own W&B run, also on failure
    if result["is_global_zero"]:
        log.info("Outputs of this run:\n  %s", "\n  ".join(f"{k}: {v}" for k, v in run_outputs(result).items()))
    return result


def run_outputs(result: dict) -> dict:
    """Where a finished run's products are, for the closing message."""
    named = {
        "run folder": result["output_dir"],
        "exported model": result.get("pipeline"),
        "final samples": result.get("samples"),
        "evaluation": result.get("eval") and result["eval"]["metrics_file"],
        "W&B": result.get("wandb"),
    }
    return {name: value for name, value in named.items() if value}


def build_validation(cfg: DictConfig, parts: TrainingParts) -> Validation | None:
    """The validation callback (validation.enabled), with the run's prompts and the photos evaluation reads."""
    if not cfg.validation.enabled:
        return None
    real_images_dir = cfg.validation.real_images_dir or parts.instance_dir
    prompts = validation_prompts(cfg, parts.prompts["identifier"], parts.prompts["class_noun"])
    return Validation(cfg.validation, prompts, cfg.subject.class_noun, real_images_dir, cfg.paths.output_dir)


def fit_and_export(cfg: DictConfig, parts: TrainingParts, loggers: list, ckpt_path: str | None = None) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    pretrained, method, prompts, datamodule, module = (
        parts.pretrained,
        parts.method,
        parts.prompts,
        parts.datamodule,
        parts.module,
    )
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    validation = build_validation(cfg, parts)
    callbacks += [validation] if validation else []
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({**run_config, "prompts": prompts})

    check_checkpoint_fits(ckpt_path, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    result = {
        "output_dir": str(output_dir),
        "global_step": trainer.global_step,
        "module": module,
        "is_global_zero": trainer.is_global_zero,
        "wandb": wandb_location(loggers),
        **prompts,
    }
    if trainer.is_global_zero and cfg.export.enabled:
        base_model = os.path.abspath(pretrained) if os.path.exists(pretrained) else pretrained
        export_info = {
            **prompts,
            "subject": cfg.subject.name,
            "instance_dir": os.path.abspath(parts.instance_dir),
            "real_images_dir": os.path.abspath(cfg.eval.real_images_dir or parts.instance_dir),  # what evaluation reads
            "base_model": base_model,
            "method": method.name,
            "steps": trainer.global_step,
        }
        if validation and validation.selection:
            validation.restore_selected(module)
            export_info["validation"] = validation.selection
        retire_eval(output_dir)
        result["pipeline"] = str(method.export(module, output_dir, export_info, cfg.export.dtype))
        log.info("Exported the fine-tuned model (%s) to %s", method.name, result["pipeline"])
        result.update(render_export(cfg, result["pipeline"], export_info, loggers))
    return result


def render_export(cfg: DictConfig, pipeline: str, export_info: dict, loggers: list) -> dict:
    """The final samples and the evaluation of the export, from one load of it when both render on the same
    device in the same dtype (render() puts back the scheduler the samples swap, so the evaluation's numbers
    are those of a fresh load)."""
    samples = OmegaConf.to_container(cfg.export.samples, resolve=True)
    device, dtype = cfg.eval.device, cfg.eval.dtype
    same_place = (samples.get("device"), samples.get("dtype")) == (device, dtype)
    shared = bool(samples["prompts"]) and cfg.eval.enabled and same_place
    rendered = {}
    with loaded_pipeline(pipeline, device, dtype) if shared else nullcontext() as pipe:
        if samples["prompts"]:
            output_dir = str(Path(cfg.paths.output_dir) / layout.FINAL_SAMPLES)
            rendered["samples"] = str(generate(pipeline=pipeline, output_dir=output_dir, pipe=pipe, **samples))
        if cfg.eval.enabled:
            rendered["eval"] = evaluate_run(
                pipeline_dir=pipeline,
                output_dir=str(Path(cfg.paths.output_dir)),
                eval_cfg=cfg.eval,
                real_images_dir=export_info["real_images_dir"],
                subject=cfg.subject.name,
                class_noun=cfg.subject.class_noun,
                identifier=export_info["identifier"],
                instance_class_noun=export_info["class_noun"],
                provenance=provenance_from_config(cfg),
                loggers=loggers,
                pipe=pipe,
            )
    return rendered
