"""The up-front checks, every config check of the package once: values that would only fail after minutes
of work (or after the weights load) are refused here first, naming the option.

`check_config` (train.py), `check_eval_config` (train.py with eval.enabled, and `python -m
dreambooth_pl.evaluate`) run before any weights load, and `model_checks` (what a model config registers)
once the photos are found; `DreamBoothModule` calls `module_problems` before it loads its components, for a
module built without train.py.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from dreambooth_pl.evaluation.protocol import SEED_STRIDE, read_prompt_lists
from dreambooth_pl.models.families import get_family
from dreambooth_pl.text.prompts import check_template, require_identifier
from dreambooth_pl.util.config import ConfigError, non_finite
from dreambooth_pl.util.images import list_images
from dreambooth_pl.util.threads import cpu_threads_problems

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4",)
SUBJECT_METRICS = ("dino", "clip_i")


def seed_problems(seed, option: str) -> list[str]:
    """A seed torch's generators take: a whole number in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return [f"{option}={seed} must be a whole number"]
    if not 0 <= seed < 2**32:
        return [f"{option}={seed} must be between 0 and 2**32 - 1"]
    return []


def quantize_problems(quantize_base: str | None, trains_adapters: bool) -> list[str]:
    """`module.quantize_base`: a 4-bit frozen base (bitsandbytes NF4) needs CUDA and a method that keeps the
    base frozen (LoRA)."""
    if quantize_base is None:
        return []
    if quantize_base not in QUANTIZATIONS:
        return [f"module.quantize_base={quantize_base!r}: use {' or '.join(QUANTIZATIONS)} or null."]
    problems = []
    if not torch.cuda.is_available():
        problems.append(f"module.quantize_base={quantize_base}: 4-bit weights (bitsandbytes) need a CUDA GPU")
    if not trains_adapters:
        problems.append(f"module.quantize_base={quantize_base}: a 4-bit base cannot be fine-tuned; use method=lora.")
    return problems


def module_problems(quantize_base: str | None, trains_adapters: bool) -> None:
    """What a DreamBoothModule refuses before loading any weights (ValueError: it may be built from code)."""
    problems = quantize_problems(quantize_base, trains_adapters)
    if problems:
        raise ValueError("\n".join(problems))


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
        problems += seed_problems(OmegaConf.select(cfg, option), f"eval.{option}")
    if problems:
        raise ConfigError("Invalid eval config:\n  " + "\n  ".join(problems))
    read_prompt_lists(cfg.prompts_file)  # a missing or foreign prompts file, named now
    if cfg.real_images_dir:
        list_images(cfg.real_images_dir, option="eval.real_images_dir")  # a missing or empty folder, named now


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
    if family.textual_inversion_refusal and get_class(cfg.method._target_).learns_token_only:
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


def model_checks(cfg: DictConfig, pretrained: str, instance_dir: str) -> None:
    """The checks a model's config registers (`model.checks`: `_target_`s called with the resolved model and
    photos folders, that warn or raise ConfigError), e.g. the toy world's (conf/model/toy.yaml)."""
    for check in instantiate(cfg.model.get("checks") or []):
        check(pretrained, instance_dir)


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


def validation_problems(cfg: DictConfig) -> list[str]:
    """Every validation option checked before any work (train.py: before class images and training)."""
    v = cfg.validation
    problems = non_finite(v, "validation")
    if v.select not in ("best", "last"):
        problems.append(f"validation.select={v.select!r}: use best or last")
    if not 1 <= v.every_n_steps <= cfg.trainer.max_steps:
        problems.append(
            f"validation.every_n_steps={v.every_n_steps} must be between 1 and "
            f"trainer.max_steps={cfg.trainer.max_steps}"
        )
    if not 1 <= v.images_per_prompt <= SEED_STRIDE:
        problems.append(f"validation.images_per_prompt={v.images_per_prompt} must be between 1 and {SEED_STRIDE}")
    if v.rule.subject_metric not in SUBJECT_METRICS:
        problems.append(f"validation.rule.subject_metric={v.rule.subject_metric!r}: use dino or clip_i")
    if not v.rule.max_clip_t_drop >= 0:
        problems.append(f"validation.rule.max_clip_t_drop={v.rule.max_clip_t_drop} must be >= 0")
    if v.pres.num_images < 0:
        problems.append(f"validation.pres.num_images={v.pres.num_images} must be >= 0 (0: no PRES)")
    for option in ("sampler.num_inference_steps", "sampler.batch_size", "embed_batch_size"):
        if OmegaConf.select(v, option) < 1:
            problems.append(f"validation.{option}={OmegaConf.select(v, option)} must be >= 1")
    if v.sampler.resolution < 8 or v.sampler.resolution % 8:
        problems.append(f"validation.sampler.resolution={v.sampler.resolution} must be a positive multiple of 8")
    for option in ("seed", "pres.seed"):
        problems += seed_problems(OmegaConf.select(v, option), f"validation.{option}")
    if cfg.module.get("free_text_encoders"):
        problems.append("validation.enabled=true renders with the text encoders: module.free_text_encoders drops them")
    if v.real_images_dir:
        try:
            list_images(v.real_images_dir, option="validation.real_images_dir")  # a missing or empty folder
        except ConfigError as err:
            problems.append(str(err))
    return problems + prompt_problems(v.prompts)


def prompt_problems(prompts) -> list[str]:
    if not isinstance(prompts, ListConfig) or not prompts:
        return [f"validation.prompts={prompts!r} must be a non-empty list of prompt templates"]
    problems = []
    for i, template in enumerate(prompts):
        option = f"validation.prompts[{i}]"
        if not isinstance(template, str) or not template.strip():
            problems.append(f"{option}={template!r} must be a prompt template (text with {{identifier}})")
            continue
        try:
            check_template(template, option)
            require_identifier(template, option)
        except ConfigError as err:
            problems.append(str(err))
    return problems
