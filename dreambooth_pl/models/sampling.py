"""One way to render prompts, shared by class images, training samples and `generate`.

Each image has its own seed and generator, so an image is the same whether it is rendered alone,
in a batch, or again after a crash.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import diffusers
import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplerSettings:
    """What decides the pixels besides the model and the prompt (part of class-image cache keys)."""

    scheduler: str = "diffusers.EulerAncestralDiscreteScheduler"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    resolution: int = 512
    batch_size: int = 4


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """`diffusers.<Name>` for one of diffusers' scheduler classes; anything else is refused, never imported."""
    module, _, attribute = str(name).partition(".")
    cls = getattr(diffusers, attribute, None) if module == "diffusers" and attribute.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class (e.g. diffusers.DDIMScheduler)")
    return cls


def use_scheduler(pipe: StableDiffusionPipeline, scheduler: str) -> StableDiffusionPipeline:
    """Swap in a sampler class, keeping the model's noise schedule. Flow-matching pipelines (FLUX, SD3)
    sample only with flow-matching schedulers: another one is refused by name, not by a failure mid-render.
    The name is data (a resumed run folder may hold it): only a diffusers scheduler class is looked up."""
    cls = scheduler_class(scheduler)
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    if flow != ("FlowMatch" in cls.__name__):
        raise ValueError(
            f"{type(pipe).__name__} comes with {type(pipe.scheduler).__name__}; {scheduler} cannot sample it. Set "
            f"the sampler's scheduler (sampler.scheduler, eval.sampler.scheduler) to a "
            f"{'flow-matching' if flow else 'diffusion'} one, e.g. "
            f"{'diffusers.FlowMatchEulerDiscreteScheduler' if flow else 'diffusers.EulerAncestralDiscreteScheduler'}."
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


@torch.no_grad()
def render(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    desc: str | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Yield (index, image) for each prompt/seed pair, batch by batch. The pipeline's own scheduler is put
    back afterwards: a pipeline shared by several renders (final samples, then evaluation) samples each with
    its settings' scheduler built from the model's config, as a freshly loaded one would."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    loaded = pipe.scheduler
    use_scheduler(pipe, settings.scheduler)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield from _render_batches(pipe, prompts, seeds, settings, desc)
    finally:
        pipe.scheduler = loaded


def _render_batches(
    pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings, desc
) -> Iterator[tuple[int, Image.Image]]:
    with tqdm(total=len(prompts), desc=desc, unit="img", disable=desc is None) as bar:
        for start in range(0, len(prompts), settings.batch_size):
            stop = min(start + settings.batch_size, len(prompts))
            generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[start:stop]]
            negative = None if settings.negative_prompt is None else [settings.negative_prompt] * (stop - start)
            images = pipe(
                list(prompts[start:stop]),
                negative_prompt=negative,
                height=settings.resolution,
                width=settings.resolution,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=generators,
            ).images
            for offset, image in enumerate(images):
                yield start + offset, image
            bar.update(stop - start)
