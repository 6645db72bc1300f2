"""What a denoiser is trained to predict: eps / v prediction on a DDPM schedule (`NoisePrediction`: SD 1.x/2.x,
SDXL) or rectified flow (`FlowMatching`: FLUX.1, SD3). Each draws timesteps, noises latents and names the
target and per-sample weights; the families hand them out (`ModelFamily.objective`) and the loss
(training/losses.py) combines their terms the same way for both.
"""

from __future__ import annotations

import torch

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


def prediction_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    raise ValueError(f"Unsupported scheduler prediction_type {prediction_type!r} (epsilon or v_prediction).")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), one per sample."""
    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def _per_sample(schedule: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = schedule.to(device=like.device, dtype=torch.float32)[timesteps]
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoisePrediction:
    """eps or v prediction (the scheduler config's `prediction_type`), timesteps uniform over the training
    schedule, optional Min-SNR-gamma weights."""

    def __init__(self, scheduler, snr_gamma: float | None = None):
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma

    def timesteps(self, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        num = self.scheduler.config.num_train_timesteps
        return torch.randint(0, num, (count,), generator=generator, device=device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def terms(self, pred, latents, noise, noisy, timesteps):
        """(what is compared, with what, per-sample weights or None)."""
        prediction_type = self.scheduler.config.prediction_type
        alphas_cumprod = self.scheduler.alphas_cumprod
        target = prediction_target(prediction_type, alphas_cumprod, latents, noise, timesteps)
        weights = None
        if self.snr_gamma is not None:
            weights = snr_weights(alphas_cumprod, timesteps, self.snr_gamma, prediction_type)
        return pred, target, weights


class FlowMatching:
    """Rectified flow as diffusers' train_dreambooth_lora_flux.py / _sd3.py train it: x_t = (1 - sigma) x
    + sigma noise with sigma read off the family's FlowMatchEulerDiscreteScheduler at its training
    timesteps (its `shift` included; dynamic shifting is a sampling-time matter), timesteps drawn by
    `weighting_scheme`'s density (logit_normal: sigmoid of N(logit_mean, logit_std); mode: the SD3 paper's
    mode density with `mode_scale`; otherwise uniform), loss weights by the scheme (cosmap, sigma_sqrt;
    else 1), target noise - x. `precondition_outputs` (the SD3 script's default): compare
    x_t - sigma * prediction with x instead."""

    def __init__(
        self,
        scheduler,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = False,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"module.objective.weighting_scheme={weighting_scheme!r}: use one of {WEIGHTING_SCHEMES}")
        fresh = type(scheduler).from_config(scheduler.config)  # its training schedule, not a sampler's steps
        self.num_train_timesteps = fresh.config.num_train_timesteps
        self.schedule_timesteps = fresh.timesteps.float()
        self.schedule_sigmas = fresh.sigmas.float()
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    def timesteps(self, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, count, self.logit_mean, self.logit_std, self.mode_scale, device, generator
        )
        indices = (u * self.num_train_timesteps).long().cpu()
        return self.schedule_timesteps[indices].to(device)

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma, shaped to broadcast over `like`; timesteps must be schedule points."""
        matches = self.schedule_timesteps.to(timesteps.device)[None, :] == timesteps.float()[:, None]
        if not matches.any(dim=1).all():
            raise ValueError(f"timesteps {timesteps.tolist()} are not all on the training schedule")
        sigma = self.schedule_sigmas.to(timesteps.device)[matches.float().argmax(dim=1)]
        return sigma.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps, latents)
        return (1.0 - sigmas) * latents + sigmas * noise

    def terms(self, pred, latents, noise, noisy, timesteps):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = self.sigmas(timesteps, latents)
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).flatten().float()
        if self.precondition_outputs:
            return pred * (-sigmas) + noisy, latents, weights
        return pred, noise - latents, weights
