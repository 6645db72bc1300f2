"""Rendering the evaluation's images: the plan (file names and seeds of the protocol), the images a model
draws into `<output_dir>/eval/images/` (reused through `manifest.json`) or a world's `ImageProducer` makes
instead, and the grids of them."""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

from diffusers import DiffusionPipeline
from omegaconf import DictConfig
from PIL import Image

from dreambooth_pl.evaluation.protocol import SEED_STRIDE, EvalPrompt
from dreambooth_pl.models.hub import model_fingerprint
from dreambooth_pl.models.pipelines import loaded_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.runs.export import read_export_info
from dreambooth_pl.runs.layout import EVAL_LOCK
from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.util.files import ProcessLock, write_json_atomically
from dreambooth_pl.util.images import image_grid, is_readable_image, save_atomically

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # in the images folder: the model and sampler each file was made with


@dataclasses.dataclass(frozen=True)
class ImageJob:
    file: str
    prompt: str
    seed: int
    prompt_index: int | None = None  # None for PRES images


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
        "run_info": read_export_info(pipeline_dir),  # the manifest's key since its first version
    }
    images_dir.mkdir(parents=True, exist_ok=True)
    # One process renders into a folder at a time; another evaluation of the same run waits, then reuses.
    with ProcessLock(images_dir / EVAL_LOCK, "the evaluation images"):
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
        write_json_atomically({"model": model, "sampler": setting, "images": {**known, **wanted}}, manifest_path)
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


class ImageProducer(Protocol):
    """What makes a control row's images instead of a model: a world registers it through its `ControlJob`s
    (reporting/controls.py; the toy world's renderer). Evaluation knows it only by this interface."""

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """The image of `prompt` for `seed`, the same every time."""

    def fingerprint(self) -> dict:
        """What decides its images (its value, the code that draws): its evaluations' cache key (cache.py)."""


def produce_images(producer: ImageProducer, jobs: list[ImageJob], images_dir: Path) -> int:
    """Every job's image from `producer` (cheap: nothing is reused, and no model manifest applies)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / MANIFEST).unlink(missing_ok=True)
    for job in jobs:
        save_atomically(producer(job.prompt, job.seed), images_dir / job.file)
    return len(jobs)


def grid(images: list[Image.Image], cols: int | None, cell: int) -> Image.Image:
    """Cells of at most `cell` pixels: 100 images at 512 px would make a grid too big to look at or log."""
    return image_grid(
        [im if im.width <= cell else im.resize((cell, cell), Image.Resampling.LANCZOS) for im in images], cols
    )


def save_grids(
    eval_dir: Path, images: list[Image.Image], pres_images: list[Image.Image], per_prompt: int, cell: int
) -> dict[str, Image.Image]:
    """`grid.png` (a row per prompt) and, with PRES images, `pres_grid.png` in `eval_dir`; by name."""
    grids = {"grid": grid(images, per_prompt, cell)}
    if pres_images:
        grids["pres_grid"] = grid(pres_images, None, cell)
    for name, picture in grids.items():
        save_atomically(picture, eval_dir / f"{name}.png")
    return grids
