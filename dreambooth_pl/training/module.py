"""The DreamBooth LightningModule: frozen VAE (and text encoders), trainable denoiser, combined loss.

The denoiser (a UNet, or FLUX's / SD3's transformer) sits under its pipeline name (`unet`, `transformer`),
so checkpoint keys and exports use the names the family's pipeline uses; the family says how it is called
and what it learns to predict (its objective).

Which parameters learn, and what is exported, is the `method`'s decision (methods.py): full
fine-tuning, LoRA or Textual Inversion share everything here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from dreambooth_pl.checks import module_problems
from dreambooth_pl.models.families import Components, PromptEmbeddings, get_family
from dreambooth_pl.runs.layout import CHECKPOINTS, LAST_GOOD_CHECKPOINT
from dreambooth_pl.training.losses import DreamBoothLoss, dreambooth_loss, offset_noise
from dreambooth_pl.training.methods import FineTuneMethod
from dreambooth_pl.util.config import ConfigError

log = logging.getLogger(__name__)
HALF_PRECISIONS = {"bf16": torch.bfloat16, "16": torch.float16}


class TrainingDiverged(ConfigError, FloatingPointError):
    """The loss became NaN or infinite: a setting (learning rate, precision) to change, said in one line."""


def quantized_denoiser(quantize_base: str | None) -> dict | None:
    """from_pretrained arguments that load the frozen denoiser in 4 bits (bitsandbytes NF4, CUDA only; checked
    in checks.quantize_problems)."""
    if quantize_base is None:
        return None
    from diffusers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "dtype": torch.bfloat16}


def enable_text_encoder_checkpointing(encoder: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: transformers 4's default (reentrant) gives adapters inside a frozen
    encoder no gradient ("None of the inputs have requires_grad=True"), so its LoRA would never move."""
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DreamBoothModule(L.LightningModule):
    def __init__(
        self,
        pretrained: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        scale_lr: bool = False,
        method: FineTuneMethod | None = None,
        prior_weight: float = 1.0,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        gradient_checkpointing: bool = False,
        cache_latents: bool = True,
        cache_text_embeddings: bool = True,
        channels_last: bool = False,
        compile_unet: bool = False,
        revision: str | None = None,
        variant: str | None = None,
        seed: int = 0,
        family: str = "sd",
        vae: str | None = None,
        family_options: dict | None = None,
        objective: dict | None = None,
        text_encoder_lr: float | None = None,
        text_encoder_weight_decay: float | None = None,
        free_text_encoders: bool = False,
        quantize_base: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "method"])
        method = method or FineTuneMethod()
        module_problems(quantize_base, method.trains_adapters)
        self.family = get_family(family, **(family_options or {}))
        self._attach_components(
            self.family.load_components(pretrained, revision, variant, vae, quantized_denoiser(quantize_base))
        )
        self.objective = self.family.objective(self.noise_scheduler, snr_gamma, **(objective or {}))
        self.optimizer_factory = optimizer
        self.text_encoder_lr = text_encoder_lr
        self.text_encoder_weight_decay = text_encoder_weight_decay
        self.lr_scheduler_factory = lr_scheduler
        self.scale_lr = scale_lr
        self.prior_weight = prior_weight
        self.noise_offset = noise_offset
        # Encode each fixed prompt and each image view once: the frozen encoders give the same answer
        # every step. The latent cache keeps the distribution's parameters, so sampling still happens.
        self.cache_latents = cache_latents
        self.cache_text_embeddings = cache_text_embeddings
        self._latent_cache: dict[str, torch.Tensor] = {}
        self._text_cache: dict[str, PromptEmbeddings] = {}

        for model in (self.denoiser, self.vae, *self.text_encoders.values()):
            model.requires_grad_(False)
        self.method = method
        self.method.attach(self)
        # frozen encoders whose outputs for the run's fixed prompts are all cached, then dropped (fit start)
        self.free_text_encoders = free_text_encoders
        if free_text_encoders and (self.text_encoder_learns or not cache_text_embeddings):
            raise ValueError(
                "module.free_text_encoders=true drops the text encoders after caching the fixed prompts' "
                "embeddings: it needs module.cache_text_embeddings=true and frozen text encoders "
                "(method.train_text_encoder=false)."
            )
        self.vae.eval()
        self._speed_options(channels_last, compile_unet, gradient_checkpointing)
        # Only what learns goes into checkpoints (the rest comes from `pretrained`), so load non-strictly.
        self.strict_loading = False
        # Training noise, timesteps and latent samples come from this generator alone; its state travels
        # in checkpoints, so a resumed run draws exactly what an uninterrupted one would have.
        self.seed = seed
        self.noise_generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._accumulated: dict[str, torch.Tensor] = {}

    def _attach_components(self, parts) -> None:
        """Text encoders are attributes under their pipeline names (text_encoder, text_encoder_2, ...), so
        checkpoint keys and exports use the names the family's pipeline uses."""
        self.denoiser_name = self.family.denoiser_name
        setattr(self, self.denoiser_name, parts.denoiser)
        self.vae = parts.vae
        self.text_encoder_names = list(parts.text_encoders)
        for name, encoder in parts.text_encoders.items():
            setattr(self, name, encoder)
        self.tokenizers = parts.tokenizers
        self.noise_scheduler = parts.noise_scheduler

    def _speed_options(self, channels_last: bool, compile_unet: bool, gradient_checkpointing: bool) -> None:
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if compile_unet:
            self.denoiser.compile()  # in place: parameter names, checkpoints and export are unchanged
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            for name in self.learning_text_encoders:
                enable_text_encoder_checkpointing(self.text_encoders[name])

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in self.text_encoder_names}

    @property
    def learning_text_encoders(self) -> list[str]:
        """The text encoders with trainable parameters (FLUX's and SD3's T5 never has any)."""
        return [n for n, e in self.text_encoders.items() if any(p.requires_grad for p in e.parameters())]

    @property
    def text_encoder_learns(self) -> bool:
        return bool(self.learning_text_encoders)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """The optimizer's groups: whatever learns in the denoiser (and VAE: nothing) at the optimizer's
        settings; text-encoder parameters at `text_encoder_lr` / `text_encoder_weight_decay` where set, as
        the diffusers LoRA scripts train them (5e-6, 1e-3 beside the denoiser's 1e-4)."""
        text = [p for e in self.text_encoders.values() for p in e.parameters() if p.requires_grad]
        text_ids = {id(p) for p in text}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in text_ids]}]
        if text:
            settings = {"lr": self.text_encoder_lr, "weight_decay": self.text_encoder_weight_decay}
            groups.append({"params": text, **{k: v for k, v in settings.items() if v is not None}})
        return [g for g in groups if g["params"]]

    def setup(self, stage: str) -> None:
        """Under half-precision training, frozen weights are stored in the compute dtype to save memory;
        whatever learns (full weights, LoRA adapters) stays in fp32, and so do the models the method keeps
        whole in fp32, and the VAE where its config says it overflows in half precision (force_upcast: SDXL's).
        The export reads frozen weights from the base model, never these rounded copies."""
        half = next((d for k, d in HALF_PRECISIONS.items() if str(self.trainer.precision).startswith(k)), None)
        if half is None:
            return
        for name in (self.denoiser_name, "vae", *self.text_encoder_names):
            model = getattr(self, name)
            if getattr(model, "is_quantized", False):
                continue  # 4-bit weights compute in their own dtype
            upcast_vae = name == "vae" and getattr(model.config, "force_upcast", False)
            if upcast_vae or self.method.keeps_full_precision(name, self.text_encoder_names):
                model.float()
                continue
            for param in model.parameters():
                param.data = param.data.to(torch.float32 if param.requires_grad else half)

    def on_fit_start(self) -> None:
        if self.free_text_encoders:
            self.cache_prompts_and_free_text_encoders(self.trainer.datamodule.fixed_prompts())

    def cache_prompts_and_free_text_encoders(self, prompts: list[str]) -> None:
        """Encode every prompt training will see, then drop the encoders (T5-XXL alone is 9 GB in bf16)."""
        self.encode_prompts(prompts)
        for name in self.text_encoder_names:
            delattr(self, name)
        self.text_encoder_names = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("module.free_text_encoders: %d prompts cached, text encoders freed", len(self._text_cache))

    def on_train_start(self) -> None:
        # Lightning keeps the modes the loaded models came in (eval): without this the denoiser would train in
        # eval mode until the first sample grid's `train()`, so a resumed run's numbers would depend on
        # whether a grid was drawn since the start of the process.
        self.train()
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.seed + self.global_rank)
        if self._generator_state is not None:
            states = self._generator_state  # one row per rank; a single state from older checkpoints
            self.noise_generator.set_state(states[self.global_rank].clone() if states.dim() == 2 else states)
            self._generator_state = None
        for name, param in self.named_parameters():
            if name in self._accumulated:
                grad = self._accumulated[name]
                if self.trainer.world_size > 1:
                    grad = grad[self.global_rank]  # this rank's own partial sums (DDP's bucket copies them in)
                param.grad = grad.to(param.device, param.dtype)
        self._accumulated = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        learning = self.learning_text_encoders
        for name, encoder in self.text_encoders.items():
            # a frozen encoder stays in eval mode: T5's dropout (0.1) would noise the conditioning in training
            encoder.train(mode and name in learning)
        return self

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        if not self.cache_text_embeddings or self.text_encoder_learns:
            return self._run_text_encoders(prompts)
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing and not self.text_encoder_names:
            raise RuntimeError(
                f"module.free_text_encoders: prompts {missing} were not cached before the encoders were freed"
            )
        if missing:
            with torch.no_grad():
                self._text_cache.update(zip(missing, self._run_text_encoders(missing).rows(), strict=True))
        return PromptEmbeddings.stack([self._text_cache[p] for p in prompts])

    def _run_text_encoders(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.set_grad_enabled(self.text_encoder_learns and torch.is_grad_enabled()):
            return self.family.encode_prompts(self.tokenizers, self.text_encoders, prompts)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, cache_keys: list[str | None] | None = None) -> torch.Tensor:
        """Sample latents; with cache keys (one per image view), the VAE encoder runs once per view."""
        if not self.cache_latents or cache_keys is None or None in cache_keys:
            moments = self._run_vae_encoder(pixel_values)
        else:
            for i, key in enumerate(cache_keys):
                if key not in self._latent_cache:  # one view at a time: the result never depends on batching
                    self._latent_cache[key] = self._run_vae_encoder(pixel_values[i : i + 1])[0]
            moments = torch.stack([self._latent_cache[key] for key in cache_keys])
        latents = DiagonalGaussianDistribution(moments).sample(self.noise_generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def _run_vae_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """In the VAE's own dtype, outside autocast: an fp32 (upcast) VAE must not be cast back to half."""
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.parameters

    def compute_loss(
        self, batch: dict, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
    ) -> DreamBoothLoss:
        """Noise, timesteps: drawn at random unless given (tests and fixed-noise probes pass them)."""
        latents = self.encode_images(batch["pixel_values"], batch.get("cache_keys"))
        draw = {"generator": self.noise_generator, "device": latents.device}
        if noise is None:  # in one layout whatever the latents' strides (cached or not), so runs repeat exactly
            noise = offset_noise(torch.randn(latents.shape, **draw), self.noise_offset, self.noise_generator)
        if timesteps is None:
            timesteps = self.objective.timesteps(len(latents), self.noise_generator, latents.device)
        noisy = self.objective.add_noise(latents, noise, timesteps)
        pred = self.family.predict(
            self.denoiser,
            noisy,
            timesteps,
            self.encode_prompts(batch["prompts"]).to(noisy.dtype),
            batch.get("original_sizes"),
            batch.get("crops_top_left"),
            tuple(batch["pixel_values"].shape[-2:]),
        )
        pred, target, weights = self.objective.terms(pred, latents, noise, noisy, timesteps)
        return dreambooth_loss(pred, target, batch["is_prior"].to(pred.device), self.prior_weight, weights)

    def checkpoint_dir(self) -> Path:
        """The checkpoint callback's folder (callbacks.checkpoint.dirpath), else the run folder's default."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        return Path(self.trainer.default_root_dir) / CHECKPOINTS

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        size = len(batch["prompts"])
        self.log("train/loss", loss.total, prog_bar=True, batch_size=size)
        self.log("train/instance_loss", loss.instance, batch_size=size)
        if loss.prior is not None:
            self.log("train/prior_loss", loss.prior, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        # Every rank stops together (saving is collective), even when one rank alone sees the bad loss.
        if self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss.total).item(), all=False):
            # The weights still hold the last good step: keep them before stopping.
            path = self.checkpoint_dir() / LAST_GOOD_CHECKPOINT
            self.trainer.save_checkpoint(path)
            raise TrainingDiverged(
                f"Training loss became non-finite ({loss.total.item()} on rank {self.global_rank}) at step "
                f"{self.global_step}; the last good state is saved in {path}. Lower module.optimizer.lr or set "
                "trainer.gradient_clip_val."
            )
        return loss.total

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.method.after_optimizer_step(self)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scale_lr:
            # The learning rate is per image: multiply by the images behind each optimizer step, as the
            # diffusers examples' --scale_lr does (accumulation x batch x processes).
            batch_size = self.trainer.datamodule.batch_size
            factor = self.trainer.accumulate_grad_batches * batch_size * self.trainer.world_size
            for group in optimizer.param_groups:
                group["lr"] *= factor
            log.info("module.scale_lr: learning rate x %d = %g", factor, optimizer.param_groups[0]["lr"])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        learns = {name for name, p in self.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k not in learns]:
            del state[key]
        if self.noise_generator is not None:
            # Every rank's state (this hook runs on all ranks together), so that each resumes its own stream.
            state = self.noise_generator.get_state()
            if self.trainer.world_size > 1:
                state = self.all_gather(state.to(self.device)).cpu()
            checkpoint["noise_generator_state"] = state
        if self.trainer.fit_loop.epoch_loop._should_accumulate():
            # Stopped inside a gradient-accumulation window (SIGTERM): the window's gradients so far, which the
            # resumed run adds to before its optimizer step. Under DDP's no_sync each rank holds its own partial
            # sums: one row per rank, gathered on all ranks together like the noise-generator states.
            # (DDP runs with find_unused_parameters=false: every rank holds a gradient for the same parameters.)
            grads = {name: p.grad for name, p in self.named_parameters() if p.requires_grad and p.grad is not None}
            if self.trainer.world_size > 1:
                grads = {name: self.all_gather(grad).cpu() for name, grad in grads.items()}
            checkpoint["accumulated_gradients"] = grads

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._generator_state = checkpoint.get("noise_generator_state")
        self._accumulated = checkpoint.get("accumulated_gradients", {})

    def pipeline(self) -> DiffusionPipeline:
        """An inference pipeline that shares this module's current weights."""
        parts = Components(
            self.denoiser, self.vae, self.noise_scheduler, self.text_encoders, self.tokenizers, self.denoiser_name
        )
        return self.family.assemble_pipeline(parts)
