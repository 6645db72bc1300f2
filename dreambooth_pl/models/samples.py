"""Prompts rendered with an exported model into a folder of PNGs and a labelled grid: a run's final samples
(training.job) and `python -m dreambooth_pl.generate`."""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import DiffusionPipeline

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.runs.export import read_export_info, write_dir_atomically
from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.util.images import image_grid

log = logging.getLogger(__name__)


def generate(
    pipeline: str,
    prompts: list[str],
    output_dir: str,
    sampler: SamplerSettings | dict,
    images_per_prompt: int = 4,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    pipe: DiffusionPipeline | None = None,
) -> Path:
    """Save one PNG per image and a grid (a row per prompt, labelled with it); return the grid's path.

    Templates may use {identifier} and {class_noun}: they are filled from the run's dreambooth.json.
    The folder is replaced as a whole, so it holds exactly the images its prompts.txt lists. `pipe`: the
    `pipeline` folder already loaded (on `device`, in `dtype`), by a caller that renders more with it.
    """
    info = read_export_info(pipeline)
    filled = [fill_prompt(t, info.get("identifier", ""), info.get("class_noun", "")) for t in prompts]
    settings = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings(**sampler)
    rows = [p for p in filled for _ in range(images_per_prompt)]
    seeds = [seed + i % images_per_prompt for i in range(len(rows))]

    def write(folder: Path) -> None:
        images = []
        loaded = pipe or load_pipeline(pipeline, device, dtype)
        for index, image in render(loaded, rows, seeds, settings, desc="generate"):
            prompt_index, image_index = divmod(index, images_per_prompt)
            image.save(folder / f"p{prompt_index:02d}_{image_index:02d}.png")
            images.append(image)
        (folder / "prompts.txt").write_text("\n".join(filled) + "\n")
        image_grid(images, cols=images_per_prompt, row_labels=filled).save(folder / "grid.png")
        log.info("Wrote %d images and a grid to %s", len(images), Path(output_dir).resolve())

    return write_dir_atomically(output_dir, write) / "grid.png"
