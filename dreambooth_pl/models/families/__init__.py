"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, ... behind one small interface.

A family (`base.ModelFamily`) names its pipeline class and its text encoders and tokenizers, loads them,
turns prompts (and each image's size and crop) into the denoiser's conditioning, and writes LoRA and
Textual Inversion files its pipeline's loaders read. The module, data, loss, methods, caches, generation
and evaluation talk only to it, so a new family is one new file here and one line in `FAMILIES`.
"""

from __future__ import annotations

from hydra.utils import get_class

from dreambooth_pl.models.families.base import Components, ModelFamily, PromptEmbeddings

FAMILIES = {
    "sd": "dreambooth_pl.models.families.sd.StableDiffusion",
    "sdxl": "dreambooth_pl.models.families.sdxl.StableDiffusionXL",
    "flux": "dreambooth_pl.models.families.flux.Flux",
    "sd3": "dreambooth_pl.models.families.sd3.StableDiffusion3",
}


def get_family(name: str, **options) -> ModelFamily:
    """The family by its `model.family` name; `options` (`module.family_options`) go to its constructor."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}: use one of {', '.join(FAMILIES)}.")
    try:
        return get_class(FAMILIES[name])(**options)
    except TypeError as err:
        raise ValueError(f"module.family_options {sorted(options)} do not fit model.family={name}: {err}") from err


def family_of_pipeline(class_name: str) -> ModelFamily:
    """The family of a pipeline class, as model_index.json names it: exports and folders handed to
    `generate` or `evaluate` carry no config, their pipeline class says it."""
    for name in FAMILIES:
        family = get_family(name)
        if family.pipeline_class.__name__ == class_name:
            return family
    raise ValueError(f"{class_name} belongs to no model family ({', '.join(FAMILIES)}).")


__all__ = ["FAMILIES", "Components", "ModelFamily", "PromptEmbeddings", "family_of_pipeline", "get_family"]
