"""Sample grids during training: people judge a DreamBooth run by looking, not by its loss."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.runs.layout import SAMPLES
from dreambooth_pl.training.validation import Validation
from dreambooth_pl.util.images import image_grid, save_atomically

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every `every_n_steps` (and at the end, unless validation rendered that step) render the datamodule's
    validation prompts.

    The grid has one row per prompt and `images_per_prompt` fixed seeds per row, so grids from
    different steps compare image by image. Saved as PNG and logged to W&B when it is active.
    """

    def __init__(
        self,
        sampler: SamplerSettings | dict,
        every_n_steps: int = 100,
        images_per_prompt: int = 2,
        seed: int = 0,
        dirname: str = SAMPLES,
    ):
        self.sampler = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings(**sampler)
        self.every_n_steps = every_n_steps
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.dirname = dirname

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if any(isinstance(c, Validation) and c.validated(step) for c in trainer.callbacks):
            log.info("No sample grid at step %d: validation rendered it (validation/step_%06d.png)", step, step)
            return
        self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        prompts = trainer.datamodule.validation_prompts
        if not prompts:
            return
        if not pl_module.text_encoder_names:
            log.info("No sample grid: module.free_text_encoders dropped the text encoders it needs")
            return
        rows = [p for p in prompts for _ in range(self.images_per_prompt)]
        seeds = [self.seed + i % self.images_per_prompt for i in range(len(rows))]
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            images = [image for _, image in render(pl_module.pipeline(), rows, seeds, self.sampler)]
        pl_module.train(was_training)
        grid = image_grid(images, cols=self.images_per_prompt, row_labels=prompts)
        path = save_atomically(
            grid, Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:06d}.png"
        )
        log.info("Sample grid at step %d: %s", trainer.global_step, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=trainer.global_step, caption=[" | ".join(prompts)])


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run in optimizer steps, `step 100/300`: a DreamBooth run is a step budget
    (`trainer.max_steps`) over as many epochs as it takes, so an epoch bar would read `Epoch 1/-2`."""

    BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format, bar.unit = self.BAR_FORMAT, "step"
        return bar

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = self.train_progress_bar.n = trainer.global_step  # a resume goes on

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """One bar across epochs: nothing to reset."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if step != bar.n and (step % self.refresh_rate == 0 or step == trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also redraws

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version, not progress
        return metrics
