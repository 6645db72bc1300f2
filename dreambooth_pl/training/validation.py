"""Validation during training: where a DreamBooth run's sweet spot is, measured, and the step chosen by it.

At step 0 (the base model), every `validation.every_n_steps` and at the last step, a few fixed prompts are
rendered with the current weights through the evaluation's sampler and scored with the evaluation's readers:
subject fidelity (DINO, CLIP-I against the subject's photos) and prompt fidelity (CLIP-T). `select: best`
keeps the trainable weights of the step `select_step` picks and the job exports them (docs/validation.md).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.evaluation.evaluate import Scorers, load_readers, score
from dreambooth_pl.evaluation.protocol import EvalPrompt
from dreambooth_pl.evaluation.render import plan_images
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.runs.layout import TRADEOFF_FIGURE, VALIDATION_CURVE, VALIDATION_DIR, VALIDATION_SELECTED
from dreambooth_pl.text.prompts import fill_prompt
from dreambooth_pl.util.files import atomic_file
from dreambooth_pl.util.images import image_grid, list_images, load_rgb, save_atomically
from dreambooth_pl.util.tradeoff_plot import PlotCurve, tradeoff_plot

log = logging.getLogger(__name__)

RULE = (
    "the trained step with the highest {metric} among those whose CLIP-T is at least the base model's (step 0) "
    "minus {drop}; ties go to the earlier step; when no trained step is that close, the trained step with the "
    "highest CLIP-T"
)
# What a failing validation may raise without losing the training: a full disk, no memory for the renders.
SURVIVABLE = (OSError, MemoryError, torch.OutOfMemoryError)


def select_step(rows: list[dict], metric: str = "dino", max_clip_t_drop: float = 0.03) -> tuple[int | None, str]:
    """The step the rule picks from validation rows ({"step", metric, "clip_t"}, first row the base model), and
    why. The base model itself is never picked: it has not learned the subject. A flat curve (every step alike)
    gives the first trained step. Adding a row changes the choice only to that row, so one kept copy suffices."""
    base, trained = rows[0], rows[1:]
    if not trained:
        return None, "no trained step was validated"
    floor = base["clip_t"] - max_clip_t_drop
    within = [r for r in trained if r["clip_t"] >= floor]
    if within:
        best = max(within, key=lambda r: r[metric])  # max keeps the first of equals: the earlier step
        return best["step"], f"highest {metric} of {len(within)} trained steps with CLIP-T >= {floor:.4f}"
    best = max(trained, key=lambda r: r["clip_t"])
    return best["step"], f"no trained step has CLIP-T >= {floor:.4f}: the highest CLIP-T"


def validation_prompts(cfg: DictConfig, identifier: str, class_noun: str) -> list[EvalPrompt]:
    """The templates filled as the instance prompt is, and without the identifier for CLIP-T (as evaluation)."""
    return [
        EvalPrompt(i, t, fill_prompt(t, identifier, class_noun), fill_prompt(t, "", class_noun))
        for i, t in enumerate(cfg.validation.prompts)
    ]


class Validation(L.Callback):
    """Measures the run at step 0, every `every_n_steps` and at the last step (rank 0 only); keeps the history
    and the selected step's trainable weights in its checkpoint state, so a resume keeps both."""

    def __init__(self, cfg: DictConfig, prompts: list[EvalPrompt], class_noun: str, real_images_dir: str, output_dir):
        self.cfg = cfg
        self.prompts = prompts
        self.jobs, self.pres_jobs = plan_images(prompts, cfg, class_noun)
        self.real_images_dir = real_images_dir
        self.dir = Path(output_dir) / VALIDATION_DIR
        self.metric = cfg.rule.subject_metric
        self.columns = ["step", "dino", "clip_i", "clip_t"] + (["pres"] if self.pres_jobs else [])
        self.history: list[dict] = []
        self.selected_step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None  # the selected step's trainable weights, on the CPU
        self.stopped: str | None = None
        self.selection: dict | None = None  # what on_train_end decided: selected.json's content
        self.seconds = 0.0  # spent validating: its cost, recorded in selected.json
        self.readers = None

    def state_dict(self) -> dict:
        return {"history": self.history, "selected_step": self.selected_step, "weights": self.weights,
                "stopped": self.stopped, "seconds": self.seconds}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.history, self.selected_step = list(state["history"]), state["selected_step"]
        self.weights, self.stopped, self.seconds = state["weights"], state["stopped"], state["seconds"]

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        with torch.random.fork_rng(devices=[]):  # loading models must not move the training's random streams
            self.readers = load_readers(self.cfg, "validation")
        self.real = [load_rgb(p) for p in list_images(self.real_images_dir, option="validation.real_images_dir")]

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.validate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.cfg.every_n_steps == 0 or step >= trainer.max_steps:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.validate(trainer, pl_module)  # a run that ended off the cadence (max_epochs)
        self.finish(trainer)

    def validated(self, step: int) -> bool:
        return any(row["step"] == step for row in self.history)

    @rank_zero_only
    def validate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if self.stopped or self.validated(step):
            return
        started = time.perf_counter()
        try:
            row, grid = self.measure(trainer, pl_module)
            self.history.append(row)
            chosen, _ = select_step(self.history, self.metric, self.cfg.rule.max_clip_t_drop)
            if self.cfg.select == "best" and chosen == step:
                self.weights = {n: p.detach().to("cpu", copy=True) for n, p in trainable(pl_module).items()}
            self.selected_step = chosen
            self.write_metrics()
            save_atomically(grid, self.dir / f"step_{step:06d}.png")
        except SURVIVABLE as err:
            self.stopped = f"step {step}: {type(err).__name__}: {err}"
            self.weights = None
            log.warning("Validation stopped at %s; training goes on and exports its last step", self.stopped)
            return
        self.log_step(trainer, row, grid)
        took = time.perf_counter() - started
        self.seconds += took
        scores = ", ".join(f"{k} {row[k]:.4f}" for k in self.columns[1:])
        log.info("Validation at step %d: %s (%.1f s)", step, scores, took)

    def measure(self, trainer: L.Trainer, pl_module) -> tuple[dict, object]:
        """Render and score with the current weights; the training's random streams are left untouched."""
        jobs = self.jobs + self.pres_jobs
        settings = SamplerSettings(**OmegaConf.to_container(self.cfg.sampler, resolve=True))
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            rendered = render(pl_module.pipeline(), [j.prompt for j in jobs], [j.seed for j in jobs], settings)
            images = [image for _, image in rendered]
        pl_module.train(was_training)
        subject, pres = images[: len(self.jobs)], images[len(self.jobs) :]
        scorers = Scorers(*self.readers, div_backend=None, distance=None)  # no DIV while training
        metrics = score(self.prompts, self.jobs, subject, pres, self.real, scorers)["metrics"]
        row = {"step": trainer.global_step, **{k: metrics[k] for k in self.columns[1:]}}
        grid = image_grid(subject, cols=self.cfg.images_per_prompt, row_labels=[p.text for p in self.prompts])
        return row, grid

    def write_metrics(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.dir / VALIDATION_CURVE, "w") as handle:
            handle.write(text.getvalue())

    def log_step(self, trainer: L.Trainer, row: dict, grid) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
            if isinstance(logger, WandbLogger):
                captions = [" | ".join(p.text for p in self.prompts)]
                logger.log_image("val/images", [grid], step=row["step"], caption=captions)

    @rank_zero_only
    def finish(self, trainer: L.Trainer) -> None:
        """The selection: selected.json, tradeoff.png and the W&B summary (a full disk costs these files only)."""
        last = self.history[-1]["step"] if self.history else trainer.global_step
        best = self.cfg.select == "best" and not self.stopped and self.selected_step is not None
        step = self.selected_step if best else last
        rows = {row["step"]: row for row in self.history}
        drop = self.cfg.rule.max_clip_t_drop
        self.selection = {
            "step": step,
            "metrics": {k: v for k, v in rows.get(step, {}).items() if k != "step"},
            "rule": RULE.format(metric=self.metric, drop=drop) if best else "the last step (validation.select=last)",
            "select": "best" if best else "last",
            "reason": select_step(self.history, self.metric, drop)[1] if best else None,
            "base": {k: v for k, v in self.history[0].items() if k != "step"} if self.history else None,
            "last_step": last,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
        }
        try:
            with atomic_file(self.dir / VALIDATION_SELECTED, "w") as handle:
                json.dump(self.selection, handle, indent=2)
            if self.history:
                floor = self.history[0]["clip_t"] - drop if best else None
                curve = PlotCurve("run", "", [(r["step"], r["clip_t"], r[self.metric]) for r in self.history], step)
                figure = tradeoff_plot([curve], self.metric.upper().replace("_", "-"), floor)
                save_atomically(figure, self.dir / TRADEOFF_FIGURE)
        except OSError as err:
            log.warning("Validation could not write its selection in %s (%s); the export goes on", self.dir, err)
        log.info("Validation selected step %s (%s)", step, self.selection["rule"])
        summary = {"val/selected_step": step, **{f"val/selected_{k}": v for k, v in self.selection["metrics"].items()}}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)

    def restore_selected(self, pl_module) -> int | None:
        """Put the selected step's trainable weights back before export (select=best); returns that step."""
        if self.selection is None or self.selection["select"] != "best" or self.weights is None:
            return None
        if self.selection["step"] != self.selection["last_step"]:
            params = trainable(pl_module)
            with torch.no_grad():
                for name, value in self.weights.items():
                    params[name].copy_(value)
            log.info("Restored the weights of step %d (validation.select=best)", self.selection["step"])
        return self.selection["step"]


def trainable(pl_module) -> dict[str, torch.nn.Parameter]:
    """What the method trains (the denoiser, LoRA adapters or the embedding table): what a step changes."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
