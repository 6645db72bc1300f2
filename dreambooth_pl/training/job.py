"""The whole job behind `python train.py`: class images, training, export, final samples."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.runs.checkpoints import check_checkpoint_fits, resolve_ckpt_path
from dreambooth_pl.util.config import ConfigError, log_paths, non_finite, resolve_path
from dreambooth_pl.util.console import one_console_handler
from dreambooth_pl.util.images import list_images
from dreambooth_pl.util.threads import cpu_threads_problems, use_cpu_threads
from dreambooth_pl.training.data import DreamBoothDataModule
from dreambooth_pl.checks import check_eval_config, quantize_problems, seed_problems
from dreambooth_pl.evaluation.evaluate import evaluate_run
from dreambooth_pl.evaluation.record import retire_eval, run_meta_from_config
from dreambooth_pl.runs import layout
from dreambooth_pl.runs.export import recover_exports
from dreambooth_pl.models.families import get_family
from dreambooth_pl.generate import generate
from dreambooth_pl.text.identifier import resolve_identifier
from dreambooth_pl.runs.loggers import close_loggers, wandb_location
from dreambooth_pl.training.methods import FineTuneMethod, TextualInversion
from dreambooth_pl.models.hub import require_reachable
from dreambooth_pl.models.pipelines import load_tokenizer, loaded_pipeline
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.training.validation import Validation, validation_problems, validation_prompts
from dreambooth_pl.text.prompts import check_template, fill_prompt, require_identifier

log = logging.getLogger(__name__)


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def prior_active(prior: DictConfig) -> bool:
    """lambda = 0 is prior preservation off: no class images are generated for it."""
    return bool(prior.enabled) and prior.weight > 0


def check_config(cfg: DictConfig) -> None:
    """Reject values that would only fail after minutes of work."""
    problems = non_finite(cfg)
    problems += seed_problems(cfg.seed, "seed")
    token, nouns = cfg.identifier.token, {cfg.subject.class_noun, cfg.prompts.instance_class_noun}
    if token is not None and str(token).strip().lower() in {str(n).strip().lower() for n in nouns if n}:
        problems.append(
            f"identifier.token={token!r} is the class noun: the identifier must be a rare word the model does "
            "not know, or the subject overwrites the class (identifier=auto finds one)"
        )
    lr = OmegaConf.select(cfg, "module.optimizer.lr")
    if lr is not None and not lr > 0:
        problems.append(f"module.optimizer.lr={lr} must be > 0")
    for option in ("sampler.num_inference_steps", "sampler.batch_size"):
        if OmegaConf.select(cfg, option) < 1:
            problems.append(f"{option}={OmegaConf.select(cfg, option)} must be >= 1")
    if cfg.model.resolution <= 0:
        problems.append(f"model.resolution={cfg.model.resolution} must be > 0")
    elif cfg.model.resolution % 8:
        problems.append(f"model.resolution={cfg.model.resolution} must be a multiple of 8")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    if cfg.sampler.resolution != cfg.model.resolution and (cfg.sampler.resolution % 8 or cfg.sampler.resolution < 8):
        problems.append(f"sampler.resolution={cfg.sampler.resolution} must be a positive multiple of 8")
    problems += cpu_threads_problems(cfg.cpu_threads)
    if cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1")
    if cfg.prior.weight < 0:
        problems.append(f"prior.weight={cfg.prior.weight} must be >= 0")
    if prior_active(cfg.prior) and cfg.prior.num_images < 1:
        problems.append(f"prior.num_images={cfg.prior.num_images} must be >= 1 while prior preservation is on")
    if prior_active(cfg.prior) and not str(cfg.subject.class_noun or "").strip():
        problems.append("subject.class_noun is empty but prior preservation needs it (or set prior.enabled=false)")
    if cfg.export.get("dtype") not in (None, *EXPORT_DTYPES):
        problems.append(f"export.dtype={cfg.export.dtype!r}: use null (the base model's) or {', '.join(EXPORT_DTYPES)}")
    if cfg.eval.enabled and not cfg.export.enabled:
        problems.append("eval.enabled=true evaluates the exported model: it needs export.enabled=true")
    problems += family_problems(cfg)
    problems += validation_problems(cfg) if cfg.validation.enabled else []
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
    if cfg.eval.enabled:
        check_eval_config(cfg.eval)
    instance = instance_templates(cfg)
    instance_options = (
        ["prompts.instance"] if len(instance) == 1 else [f"prompts.instance[{i}]" for i in range(len(instance))]
    )
    templates = dict(zip(instance_options, instance))
    templates["prompts.prior"] = cfg.prompts.prior
    templates.update({f"prompts.validation[{i}]": t for i, t in enumerate(cfg.prompts.validation)})
    templates.update({f"export.samples.prompts[{i}]": t for i, t in enumerate(cfg.export.samples.prompts or [])})
    for option, template in templates.items():
        check_template(template, option)
    for option, template in zip(instance_options, instance):
        require_identifier(template, option)
    warn_unseen_class_images(cfg)


def family_problems(cfg: DictConfig) -> list[str]:
    """Methods and memory options the model family or this machine cannot run, named before any work."""
    problems = []
    family = get_family(cfg.model.family, **cfg.module.get("family_options", {}))
    if family.textual_inversion_refusal and issubclass(get_class(cfg.method._target_), TextualInversion):
        problems.append(family.textual_inversion_refusal)
    if family.kohya_refusal and cfg.method.get("export_kohya"):
        problems.append(family.kohya_refusal)
    strategy = OmegaConf.select(cfg, "trainer.strategy._target_") or ""
    if family.fsdp_refusal and strategy.endswith("FSDPStrategy"):
        problems.append(family.fsdp_refusal)
    if not torch.cuda.is_available():
        if str(cfg.module.optimizer._target_).startswith("bitsandbytes."):
            problems.append(
                f"module.optimizer._target_={cfg.module.optimizer._target_}: 8-bit optimizers (bitsandbytes) need a "
                "CUDA GPU; on a CPU use torch.optim.AdamW"
            )
    return problems + quantize_problems(cfg.module.get("quantize_base"), get_class(cfg.method._target_).trains_adapters)


def instance_templates(cfg: DictConfig) -> list[str]:
    """`prompts.instance` is one template, or a list of which each training sample draws one."""
    instance = cfg.prompts.instance
    return [instance] if isinstance(instance, str) else list(instance)


def warn_unseen_class_images(cfg: DictConfig) -> None:
    """Each step draws data.batch_size class images: more than steps x batch are generated for nothing."""
    seen = cfg.trainer.max_steps * cfg.trainer.get("accumulate_grad_batches", 1) * cfg.data.batch_size
    if prior_active(cfg.prior) and not cfg.prior.class_dir and cfg.prior.num_images > seen:
        log.warning(
            "prior.num_images=%d but %d steps draw at most %d class images (trainer.max_steps x data.batch_size): "
            "%d will be generated and never seen. Lower prior.num_images or raise trainer.max_steps.",
            cfg.prior.num_images,
            cfg.trainer.max_steps,
            seen,
            cfg.prior.num_images - seen,
        )


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


def warn_toy_model_on_photos(cfg: DictConfig, pretrained: str, instance_dir: str) -> None:
    """The toy model knows only the toy world's cartoons: fine-tuned on photos from elsewhere it draws blobs,
    which reads as "DreamBooth does not work". Said before any work, with the command for a real model."""
    toyworld, cache = Path(cfg.paths.toyworld_dir).resolve(), Path(cfg.paths.cache_dir).resolve()
    photos = Path(instance_dir).resolve()
    if not Path(pretrained).resolve().is_relative_to(toyworld) or any(map(photos.is_relative_to, (toyworld, cache))):
        return
    log.warning(
        "model=toy knows only the toy world's cartoons (docs/toy_world.md), but the photos in %s are not from the "
        "toy world: expect blobs, not your subject. For real photos use a real model on a GPU: "
        "add `model=sd15 trainer=gpu` to this command (or model.pretrained=<a local diffusers folder>).",
        photos,
    )


@dataclass
class Run:
    """What a training job is built from; `bench` builds the same pieces."""

    pretrained: str
    instance_dir: str
    method: FineTuneMethod
    prompts: dict
    datamodule: DreamBoothDataModule
    module: DreamBoothModule


def build_run(cfg: DictConfig) -> Run:
    """Checks, prompts, data and model, in the order that reports bad input before loading weights."""
    check_config(cfg)
    use_cpu_threads(cfg.cpu_threads, cfg.trainer.accelerator)
    instance_dir = resolve_path(cfg.subject.instance_dir)
    require_photos(cfg, instance_dir)
    pretrained = resolve_path(cfg.model.pretrained)
    warn_toy_model_on_photos(cfg, pretrained, instance_dir)
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
    return Run(pretrained, instance_dir, method, prompts, datamodule, module)


def train(cfg: DictConfig) -> dict:
    one_console_handler()
    log_paths(cfg.paths.dreambooth_root, cfg.paths.toyworld_dir, cfg.paths.cache_dir, cfg.paths.log_dir)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = str(layout.checkpoint_dir(cfg, output_dir))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir, output_dir)
    if rank_zero_only.rank == 0:
        recover_exports(output_dir)
    run = build_run(cfg)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    succeeded = False
    try:
        result = fit_and_export(cfg, run, loggers, ckpt_path)
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


def build_validation(cfg: DictConfig, run: Run) -> Validation | None:
    """The validation callback (validation.enabled), with the run's prompts and the photos evaluation reads."""
    if not cfg.validation.enabled:
        return None
    real_images_dir = cfg.validation.real_images_dir or run.instance_dir
    prompts = validation_prompts(cfg, run.prompts["identifier"], run.prompts["class_noun"])
    return Validation(cfg.validation, prompts, cfg.subject.class_noun, real_images_dir, cfg.paths.output_dir)


def fit_and_export(cfg: DictConfig, run: Run, loggers: list, ckpt_path: str | None = None) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    pretrained, method, prompts, datamodule, module = (
        run.pretrained,
        run.method,
        run.prompts,
        run.datamodule,
        run.module,
    )
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    validation = build_validation(cfg, run)
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
        run_info = {
            **prompts,
            "subject": cfg.subject.name,
            "instance_dir": os.path.abspath(run.instance_dir),
            "real_images_dir": os.path.abspath(cfg.eval.real_images_dir or run.instance_dir),  # what evaluation reads
            "base_model": base_model,
            "method": method.name,
            "steps": trainer.global_step,
        }
        if validation and validation.selection:
            validation.restore_selected(module)
            run_info["validation"] = validation.selection
        retire_eval(output_dir)
        result["pipeline"] = str(method.export(module, output_dir, run_info, cfg.export.dtype))
        log.info("Exported the fine-tuned model (%s) to %s", method.name, result["pipeline"])
        result.update(render_export(cfg, result["pipeline"], run_info, loggers))
    return result


def render_export(cfg: DictConfig, pipeline: str, run_info: dict, loggers: list) -> dict:
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
                real_images_dir=run_info["real_images_dir"],
                subject=cfg.subject.name,
                class_noun=cfg.subject.class_noun,
                identifier=run_info["identifier"],
                instance_class_noun=run_info["class_noun"],
                run_meta=run_meta_from_config(cfg),
                loggers=loggers,
                pipe=pipe,
            )
    return rendered
