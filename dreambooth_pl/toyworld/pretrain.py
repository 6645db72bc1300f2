"""Pretraining the toy world's models from rendered data, stage by stage, each saved when it ends.

Stages (each reads what earlier stages saved under `out_dir`, so a crash loses only the running one):
  data      render the captioned pretraining set (cached under the cache folder, not shipped)
  vae       AutoencoderKL, reconstruction + KL                  -> out_dir/pipeline/vae
  clip      CLIPModel, contrastive on (image, caption)          -> out_dir/clip (+ its text tower and
            tokenizer become the pipeline's text_encoder/tokenizer: one text model, trained once)
  dino      ViTModel, InfoNCE: an instance's photos against look-alikes -> out_dir/dino
  unet      UNet2DConditionModel, epsilon loss, caption dropout -> out_dir/pipeline (complete)
  subjects  the toy subjects' photos and prompts_and_classes.txt -> out_dir/dataset (close-ups: out_dir/closeups)
  probe     held-out class x context x colour prompts, read back by the toy CLIP and by an attribute
            classifier trained on rendered images                       -> out_dir/probe
  prior     colour entropy of class images ("a teapot") per guidance scale, against pretraining -> out_dir/prior
  readers   do the evaluators read the subject and diversity? (toyworld/readers.py) -> out_dir/readers
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from dreambooth_pl.toyworld.models import train_clip, train_dino, train_unet, train_vae
from dreambooth_pl.toyworld.prior import class_prior, save_prior
from dreambooth_pl.toyworld.probe import AttributeProbe, probe, train_attribute_probe
from dreambooth_pl.toyworld.readers import save_readers, validate_readers
from dreambooth_pl.toyworld.subjects import write_closeups, write_subjects
from dreambooth_pl.toyworld.world import WorldData, load_or_render_world
from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.threads import use_cpu_threads

STAGES = ("data", "vae", "clip", "dino", "unet", "subjects", "probe", "prior", "readers")


def check_stages(cfg: DictConfig) -> None:
    """The command's options, refused before the first stage trains for an hour."""
    if not isinstance(cfg.stages, ListConfig):
        raise ConfigError(f"stages={cfg.stages!r} must be a list, e.g. stages=[vae,clip]: choose from {list(STAGES)}")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"toyworld stages {unknown} unknown: choose from {list(STAGES)}")
    if not 0 < cfg.closeups.crop < 1:  # before the stages ahead of `subjects` train for an hour
        raise ConfigError(f"closeups.crop={cfg.closeups.crop} must be between 0 and 1 (the share of the height shown)")


class StageInputs:
    """What several stages read, made once when the first of them asks: the rendered set and the attribute
    probe (not saved: minutes to retrain)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.data: WorldData | None = None
        self.classifier: AttributeProbe | None = None

    def world(self) -> WorldData:
        if self.data is None:
            spec = {**OmegaConf.to_container(self.cfg.data), "seed": self.cfg.seed}
            self.data = load_or_render_world(self.cfg.cache_dir, spec)
        return self.data

    def attribute_probe(self) -> AttributeProbe:
        if self.classifier is None:
            self.classifier = train_attribute_probe(self.world(), self.cfg.probe.classifier, self.cfg.seed)
        return self.classifier


def run_stage(stage: str, cfg: DictConfig, inputs: StageInputs, out: Path):
    """One stage, its files saved under `out`; its losses or findings (None for data and subjects)."""
    if stage == "data":
        inputs.world()
    elif stage == "vae":
        return train_vae(inputs.world(), cfg.vae, out, cfg.seed)
    elif stage == "clip":
        return train_clip(inputs.world(), cfg.clip, cfg.tokenizer, out, cfg.seed)
    elif stage == "dino":
        return train_dino(cfg.dino, out, cfg.data.size, cfg.seed)
    elif stage == "unet":
        return train_unet(inputs.world(), cfg.unet, cfg.scheduler, out, cfg.seed)
    elif stage == "subjects":
        write_subjects(cfg.subjects, out / "dataset", cfg.data.size)
        write_closeups(cfg.subjects, out / "closeups", cfg.data.size, cfg.closeups.crop)
    elif stage == "probe":
        return probe(inputs.world(), inputs.attribute_probe(), cfg.probe, out, cfg.seed)
    elif stage == "prior":
        found = class_prior(inputs.world(), inputs.attribute_probe(), cfg.prior, out, cfg.data.size, cfg.seed)
        save_prior(found, out / "prior")
        return found
    elif stage == "readers":
        found = validate_readers(cfg.readers, out, cfg.data.size, cfg.seed)
        save_readers(found, cfg.readers, out / "readers")
        return found
    return None


def build(cfg: DictConfig) -> dict:
    """Run the selected stages in order; print each one's time; return their losses and the probe."""
    check_stages(cfg)
    out = Path(cfg.out_dir)
    use_cpu_threads(cfg.threads, "cpu", option="threads")
    inputs, results = StageInputs(cfg), {}
    for stage in [s for s in STAGES if s in cfg.stages]:
        start = time.perf_counter()
        found = run_stage(stage, cfg, inputs, out)
        if found is not None:
            results[stage] = found
        elapsed = time.perf_counter() - start
        detail = ""
        if isinstance(found, list) and found:
            k = max(1, len(found) // 10)
            detail = f", loss {np.mean(found[:k]):.4f} -> {np.mean(found[-k:]):.4f}"
        print(f"[toyworld] stage {stage}: {elapsed:.1f} s{detail}", flush=True)
    return results
