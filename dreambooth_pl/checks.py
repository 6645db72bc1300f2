"""The up-front checks: values that would only fail after minutes of work (or after the weights load) are
refused here first, each check once, naming the option.

`training.job.check_config` (train.py) and `check_eval_config` (train.py with eval.enabled, and
`python -m dreambooth_pl.evaluate`) call these before any weights load; `DreamBoothModule` calls
`module_problems` before it loads its components, for a module built without train.py.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.evaluation.protocol import SEED_STRIDE, read_prompt_lists
from dreambooth_pl.util.config import ConfigError, non_finite
from dreambooth_pl.util.images import list_images

QUANTIZATIONS = ("nf4",)


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
