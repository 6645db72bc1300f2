"""FLUX.1 and SD3 through the family seam: flow matching, the tiny models (model=flux_tiny, sd3_tiny), parity
with transcriptions of diffusers' train_dreambooth_lora_flux.py / _sd3.py losses, exports diffusers loads,
memory options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dreambooth_pl.models.objectives import FlowMatching
from dreambooth_pl.models.pipelines import load_components
from dreambooth_pl.training.job import build_parts, train
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.util.config import ConfigError, resolve_path
from tests.conftest import FAST, compose_train, needs_dataset
from tests.test_sdxl import mixed_batch

PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
PROMPT = "a sks teapot in the snow"


def tiny_cfg(family: str, cache_dir: Path, overrides: list[str] = (), output: Path | None = None):
    return compose_train([*FAST, f"model={family}_tiny", *overrides], output or cache_dir / "unused", cache_dir)


@pytest.fixture(scope="session")
def flux_tiny(cache_dir) -> str:
    return resolve_path(tiny_cfg("flux", cache_dir).model.pretrained)


@pytest.fixture(scope="session")
def sd3_tiny(cache_dir) -> str:
    return resolve_path(tiny_cfg("sd3", cache_dir).model.pretrained)


def module_for(family: str, pretrained: str, cache_dir: Path, **kwargs) -> DreamBoothModule:
    module_cfg = tiny_cfg(family, cache_dir).module
    options = {
        "family_options": OmegaConf.to_container(module_cfg.family_options),
        "objective": OmegaConf.to_container(module_cfg.objective),
    }
    for key in ("family_options", "objective"):
        options[key].update(kwargs.pop(key, {}))
    return DreamBoothModule(pretrained, optimizer=torch.optim.AdamW, family=family, **options, **kwargs).eval()


def render(pipe, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    """A few deterministic flow-matching Euler steps at 64 px."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt,
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images[0]


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_are_the_schedulers_with_its_shift(shift):
    """Index i of the training schedule has sigma = shift s / (1 + (shift - 1) s) with s = (1000 - i) / 1000."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    objective = FlowMatching(scheduler)
    indices = [0, 250, 500, 999]
    timesteps = scheduler.timesteps[torch.tensor(indices)]
    noisy = objective.add_noise(torch.ones(4, 4, 2, 2), torch.zeros(4, 4, 2, 2), timesteps)  # = 1 - sigma
    for index, row in zip(indices, noisy, strict=True):
        raw = (1000 - index) / 1000
        sigma = shift * raw / (1 + (shift - 1) * raw)
        assert torch.allclose(row, torch.full_like(row, 1 - sigma), atol=1e-6)
    with pytest.raises(ValueError, match="not all on the training schedule"):
        objective.add_noise(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([0.5]))


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_flow_terms_match_the_formulas(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatching(scheduler, weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    # timesteps: diffusers' density with the same generator, indexed into the schedule
    drawn = objective.timesteps(6, torch.Generator().manual_seed(4), torch.device("cpu"))
    u = compute_density_for_timestep_sampling(scheme, 6, 0.3, 0.8, 1.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(drawn, scheduler.timesteps[(u * 1000).long()])
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = (torch.randn(6, 4, 4, 4, generator=g) for _ in range(3))
    noisy = objective.add_noise(latents, noise, drawn)
    compared, target, weights = objective.terms(pred, latents, noise, noisy, drawn)
    for i, t in enumerate(drawn.tolist()):
        sigma = t / 1000  # FlowMatchEulerDiscreteScheduler: timesteps = sigmas x num_train_timesteps
        assert torch.allclose(noisy[i], (1 - sigma) * latents[i] + sigma * noise[i], atol=1e-5)
        assert torch.equal(target[i], noise[i] - latents[i])
        expected = {"cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)), "sigma_sqrt": sigma**-2.0}.get(
            scheme, 1.0
        )
        assert weights[i].item() == pytest.approx(expected, rel=1e-4)
    assert torch.equal(compared, pred)


def test_preconditioned_outputs_compare_the_denoised_latents():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatching(scheduler, precondition_outputs=True)
    g = torch.Generator().manual_seed(1)
    latents, noise, pred = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    timesteps = scheduler.timesteps[torch.tensor([100, 800])]
    noisy = objective.add_noise(latents, noise, timesteps)
    compared, target, _ = objective.terms(pred, latents, noise, noisy, timesteps)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(compared, noisy - sigma * pred) and torch.equal(target, latents)


def test_flow_options_are_refused_where_they_do_not_apply(tiny_pretrained, flux_tiny, cache_dir):
    with pytest.raises(ValueError, match="module.objective.*flow-matching options"):
        DreamBoothModule(tiny_pretrained, optimizer=torch.optim.AdamW, objective={"weighting_scheme": "cosmap"})
    with pytest.raises(ValueError, match="module.snr_gamma.*weighting_scheme"):
        module_for("flux", flux_tiny, cache_dir, snr_gamma=5.0)
    with pytest.raises(ValueError, match="weighting_scheme='lognormal'"):
        module_for("flux", flux_tiny, cache_dir, objective={"weighting_scheme": "lognormal"})


# --------------------------------------------------------------------------- parity with the diffusers scripts


def flux_reference_loss(parts, batch, prior_loss_weight, guidance_scale, max_sequence_length, scheme, mode_scale):
    """One step of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (frozen text encoders, prior
    preservation), transcribed: encode_prompt (CLIP pooler_output at 77 tokens, T5 last states at
    max_sequence_length, zero text ids), latents (z - shift) x scale, latent image ids, noise, timestep
    density and schedule lookup, x_t = (1 - sigma) x + sigma noise, packing, the guidance input, the
    transformer at t / 1000, unpacking, SD3 loss weighting, target noise - x, instance + lambda prior."""
    prompts = batch["prompts"]
    clip_ids = parts.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pooled_prompt_embeds = parts.text_encoder(clip_ids.input_ids, output_hidden_states=False).pooler_output
    t5_ids = parts.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = parts.text_encoder_2(t5_ids)[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)

    vae = parts.vae
    model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    model_input = model_input.contiguous()  # see _script_latents_layout
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", model_input.dtype
    )
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
    u = compute_density_for_timestep_sampling(scheme, bsz, logit_mean=0.0, logit_std=1.0, mode_scale=mode_scale)
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = noise_scheduler_copy.sigmas[step_indices].flatten()
    while len(sigmas.shape) < model_input.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(
        noisy_model_input, model_input.shape[0], model_input.shape[1], model_input.shape[2], model_input.shape[3]
    )
    guidance = None
    if parts.transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale]).expand(model_input.shape[0])
    model_pred = parts.transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    model_pred = FluxPipeline._unpack_latents(
        model_pred,
        height=model_input.shape[2] * vae_scale_factor,
        width=model_input.shape[3] * vae_scale_factor,
        vae_scale_factor=vae_scale_factor,
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    return _script_prior_loss(model_pred, target, weighting, prior_loss_weight)


# _script_latents_layout: the scripts draw noise with randn_like(model_input), which follows the latents'
# memory layout, and that depends on the convolution backend (here, on a CPU, the VAE returns channels-last
# strides). The transcriptions make the latents contiguous first (values unchanged), so both draw the noise
# in the standard layout, as our module does whether its latents come from the cache or not.


def _script_prior_loss(model_pred, target, weighting, prior_loss_weight):
    """The two scripts' shared ending: chunk into instance and prior halves, weighted MSE per sample, means."""
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
    prior_loss = torch.mean(
        (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
            target_prior.shape[0], -1
        ),
        1,
    ).mean()
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    ).mean()
    return loss + prior_loss_weight * prior_loss


def sd3_reference_loss(parts, batch, prior_loss_weight, max_sequence_length, scheme, precondition_outputs):
    """One step of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, transcribed: encode_prompt
    (both CLIPs' hidden_states[-2] side by side and their text_embeds side by side, T5 states, CLIP states
    zero-padded to T5's width, concatenated along the sequence), latents (z - shift) x scale, noise, timestep
    density, x_t, the transformer at t, EDM preconditioning (the script's default), SD3 weighting."""
    prompts = batch["prompts"]
    clip_prompt_embeds_list, clip_pooled_prompt_embeds_list = [], []
    for tokenizer, text_encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        prompt_embeds = text_encoder(ids, output_hidden_states=True)
        clip_pooled_prompt_embeds_list.append(prompt_embeds[0])
        clip_prompt_embeds_list.append(prompt_embeds.hidden_states[-2])
    clip_prompt_embeds = torch.cat(clip_prompt_embeds_list, dim=-1)
    pooled_prompt_embeds = torch.cat(clip_pooled_prompt_embeds_list, dim=-1)
    t5_ids = parts.tokenizer_3(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    t5_prompt_embed = parts.text_encoder_3(t5_ids)[0]
    clip_prompt_embeds = F.pad(clip_prompt_embeds, (0, t5_prompt_embed.shape[-1] - clip_prompt_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_prompt_embeds, t5_prompt_embed], dim=-2)

    vae = parts.vae
    model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    model_input = model_input.contiguous()  # see _script_latents_layout
    noise = torch.randn_like(model_input)
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
    u = compute_density_for_timestep_sampling(
        scheme, model_input.shape[0], logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = noise_scheduler_copy.sigmas[step_indices].flatten()
    while len(sigmas.shape) < model_input.ndim:
        sigmas = sigmas.unsqueeze(-1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = parts.transformer(
        hidden_states=noisy_model_input,
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        return_dict=False,
    )[0]
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = model_input if precondition_outputs else noise - model_input
    return _script_prior_loss(model_pred, target, weighting, prior_loss_weight)


def _one_step(module, batch, seed):
    """Our loss with every draw (latent sample, noise, timesteps) from a generator seeded as the script's
    global RNG is: the same draws in the same order."""
    module.noise_generator = torch.Generator().manual_seed(seed)
    return module.compute_loss(batch)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap"])
def test_one_step_loss_equals_the_diffusers_flux_script(flux_tiny, cache_dir, tmp_path, scheme):
    batch, _ = mixed_batch(tmp_path)
    module = module_for("flux", flux_tiny, cache_dir, prior_weight=0.7, objective={"weighting_scheme": scheme})
    parts = load_components(flux_tiny, family="flux")
    ours = _one_step(module, batch, 11)
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = flux_reference_loss(parts, batch, 0.7, 3.5, 512, scheme, 1.29)
    assert ours.total.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert ours.prior is not None and ours.prior.item() > 0


@pytest.mark.parametrize("scheme, precondition", [("logit_normal", True), ("none", False), ("sigma_sqrt", True)])
def test_one_step_loss_equals_the_diffusers_sd3_script(sd3_tiny, cache_dir, tmp_path, scheme, precondition):
    batch, _ = mixed_batch(tmp_path)
    module = module_for(
        "sd3",
        sd3_tiny,
        cache_dir,
        prior_weight=1.3,
        family_options={"max_sequence_length": 77},  # the script's default length
        objective={"weighting_scheme": scheme, "precondition_outputs": precondition},
    )
    parts = load_components(sd3_tiny, family="sd3")
    ours = _one_step(module, batch, 5)
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = sd3_reference_loss(parts, batch, 1.3, 77, scheme, precondition)
    assert ours.total.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- training, exports, diffusers


def flow_run(family: str, root: Path, cache_dir: Path, overrides: list[str]) -> dict:
    cfg = tiny_cfg(family, cache_dir, overrides, output=root)
    return {**train(cfg), "base": resolve_path(cfg.model.pretrained), "cfg": cfg, "root": root}


@pytest.fixture(scope="module")
def flux_dreambooth_run(tmp_path_factory, cache_dir) -> dict:
    """python train.py model=flux_tiny subject=teapot (prior preservation on), shortened, with gradient
    checkpointing, cached latents (the default) and the final samples rendered from the export."""
    root = tmp_path_factory.mktemp("flux-dreambooth")
    overrides = ["module.gradient_checkpointing=true", "export.samples.prompts=['a {identifier} {class_noun}']"]
    return flow_run("flux", root, cache_dir, overrides)


@needs_dataset
def test_flux_full_fine_tune_exports_a_pipeline_diffusers_loads(flux_dreambooth_run, cache_dir):
    result = flux_dreambooth_run
    module = result["module"].eval()
    assert module.transformer.is_gradient_checkpointing and module.cache_latents and module._latent_cache
    pipe = FluxPipeline.from_pretrained(result["pipeline"])
    for (key, a), b in zip(module.transformer.state_dict().items(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b), key
    base = load_components(result["base"], family="flux")
    assert any(not torch.equal(a, b) for a, b in zip(base.transformer.parameters(), pipe.transformer.parameters()))
    assert np.abs(render(pipe) - render(module.pipeline())).max() < 1e-4
    keys = [m.read_text() for m in (cache_dir / "class_images").glob("*/manifest.json")]
    assert any(result["base"] in k for k in keys)  # class images made by the FLUX pipeline of the base model
    final = result["root"] / "final_samples" / "p00_00.png"
    assert final.is_file()


def lora_reproduces(family: str, result: dict, text_encoders: list[str]) -> None:
    weights = load_file(Path(result["pipeline"]) / "pytorch_lora_weights.safetensors")
    for prefix in ("transformer.", *(f"{name}." for name in text_encoders)):
        assert any(k.startswith(prefix) for k in weights), prefix
    module = result["module"].eval()
    pipe = PIPELINES[family].from_pretrained(result["base"])
    pipe.load_lora_weights(result["pipeline"])
    ours = render(module.pipeline())
    assert np.abs(render(pipe) - ours).max() < 1e-4
    assert np.abs(render(PIPELINES[family].from_pretrained(result["base"])) - ours).max() > 1e-3  # adapters matter


@needs_dataset
def test_flux_lora_with_clip_loads_with_its_alpha_and_trains_the_text_encoder_slower(tmp_path, cache_dir):
    overrides = ["method=lora", "method.alpha=8", "method.train_text_encoder=true", "module.optimizer.lr=1e-2"]
    result = flow_run("flux", tmp_path, cache_dir, [*overrides, "trainer.max_steps=3"])
    lora_reproduces("flux", result, ["text_encoder"])
    module = result["module"]
    assert not any(p.requires_grad for p in module.text_encoder_2.parameters())  # T5 stays frozen
    groups = module.trainer.optimizers[0].param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 1e-4), (5e-6, 1e-3)]
    # each group stepped at its own rate: lora_B starts at zero and an AdamW step moves an element by about
    # lr, so after 3 steps the CLIP adapters are within a few times 3 x 5e-6, the transformer's far beyond
    up = {
        name: max(p.abs().max().item() for n, p in getattr(module, name).named_parameters() if ".lora_B." in n)
        for name in ("text_encoder", "transformer")
    }
    assert 0 < up["text_encoder"] < 3e-5 < 1e-3 < up["transformer"]
    targets = result["cfg"].method.target_modules
    assert "ff_context.net.2" in targets and "attn.to_add_out" in targets  # the flux script's targets


@needs_dataset
def test_sd3_trains_exports_and_its_lora_loads(tmp_path, cache_dir):
    full = flow_run("sd3", tmp_path / "full", cache_dir, ["export.samples.prompts=[]"])
    module = full["module"].eval()
    pipe = StableDiffusion3Pipeline.from_pretrained(full["pipeline"])
    assert np.abs(render(pipe) - render(module.pipeline())).max() < 1e-4
    overrides = ["method=lora", "method.alpha=2", "method.train_text_encoder=true", "module.optimizer.lr=1e-2"]
    lora = flow_run(
        "sd3", tmp_path / "lora", cache_dir, [*overrides, "export.samples.prompts=[]", "trainer.max_steps=3"]
    )
    lora_reproduces("sd3", lora, ["text_encoder", "text_encoder_2"])
    assert not any(p.requires_grad for p in lora["module"].text_encoder_3.parameters())


@needs_dataset
def test_free_text_encoders_caches_the_fixed_prompts_then_drops_the_encoders(tmp_path, cache_dir):
    overrides = ["method=lora", "module.free_text_encoders=true", "export.samples.prompts=[]", "trainer.max_steps=2"]
    result = flow_run("flux", tmp_path, cache_dir, overrides)
    module = result["module"]
    assert module.text_encoder_names == [] and not hasattr(module, "text_encoder_2")
    assert set(module._text_cache) == {"a sks teapot", "a teapot"}
    assert (Path(result["pipeline"]) / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").glob("*.png"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["module.optimizer._target_=bitsandbytes.optim.AdamW8bit"], "module.optimizer._target_=bitsandbytes"),
        (["method=lora", "module.quantize_base=nf4"], "module.quantize_base=nf4: 4-bit"),
        (["method=textual_inversion"], "textual_inversion is not offered for Flux.*T5"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-only options run on a GPU")
def test_what_cannot_run_here_stops_before_any_work(tmp_path, overrides, message):
    cfg = tiny_cfg("flux", tmp_path / "cache", overrides, output=tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        build_parts(cfg)
    assert not (tmp_path / "cache").exists()  # no model built, no class image made


def test_textual_inversion_is_refused_on_sd3_with_why(sd3_tiny, cache_dir):
    from dreambooth_pl.training.methods import TextualInversion

    method = TextualInversion(initializer="teapot")
    method.prompt_token("sks")
    with pytest.raises(ValueError, match="StableDiffusion3.*T5.*method=lora"):
        module_for("sd3", sd3_tiny, cache_dir, method=method)


def test_flow_model_configs_are_consistent(tmp_path):
    """flux_random / sd3_random are the published architectures; their widths must fit together."""
    flux = compose_train(["model=flux_random"], tmp_path, tmp_path).model.pretrained
    clip, t5 = flux.text_encoders.text_encoder, flux.text_encoders.text_encoder_2
    assert (
        flux.transformer.pooled_projection_dim == clip.hidden_size
        and flux.transformer.joint_attention_dim == t5.d_model
    )
    assert sum(flux.transformer.axes_dims_rope) == flux.transformer.attention_head_dim
    assert flux.transformer.in_channels == 4 * flux.vae.latent_channels
    sd3 = compose_train(["model=sd3_random"], tmp_path, tmp_path).model.pretrained
    first, second, t5 = (sd3.text_encoders[n] for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert sd3.transformer.pooled_projection_dim == first.projection_dim + second.projection_dim == 2048
    assert sd3.transformer.joint_attention_dim == t5.d_model >= first.hidden_size + second.hidden_size
    assert (
        sd3.transformer.caption_projection_dim
        == sd3.transformer.num_attention_heads * sd3.transformer.attention_head_dim
    )
    for name in ("flux", "sd3"):
        hub = compose_train([f"model={name}", "method=lora"], tmp_path, tmp_path)
        assert hub.model.resolution == 1024 and hub.module.text_encoder_lr == 5e-6
        assert hub.sampler.scheduler == "diffusers.FlowMatchEulerDiscreteScheduler"


@needs_dataset
def test_evaluation_scores_the_flux_export(flux_dreambooth_run, tmp_path):
    from dreambooth_pl.evaluation.evaluate import evaluate_run
    from tests.test_evaluate import METRIC_KEYS, QUICK, TEAPOT, compose_eval
    from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides

    tiny = tiny_eval_overrides(tiny_embedding_models(tmp_path / "embedders"))
    sampler = flux_dreambooth_run["cfg"].eval.sampler  # what model=flux_tiny sets for evaluation (model.eval_sampler)
    assert (sampler.scheduler, sampler.resolution) == ("diffusers.FlowMatchEulerDiscreteScheduler", 64)
    flow = [f"eval.sampler.{k}={sampler[k]}" for k in ("scheduler", "guidance_scale", "resolution")]
    with pytest.raises(
        ValueError, match="FluxPipeline comes with FlowMatchEulerDiscreteScheduler.*eval.sampler.scheduler"
    ):
        evaluate_run(
            flux_dreambooth_run["pipeline"],
            str(tmp_path / "bad"),
            compose_eval([*tiny, *QUICK]).eval,
            str(TEAPOT),
            "teapot",
            "teapot",
            "sks",
        )
    eval_cfg = compose_eval([*tiny, *QUICK, *flow, "eval.images_per_prompt=2"]).eval
    result = evaluate_run(
        flux_dreambooth_run["pipeline"], str(tmp_path), eval_cfg, str(TEAPOT), "teapot", "teapot", "sks"
    )
    assert result["generated"] == 2 * 2 + 2
    metrics = json.loads(Path(result["metrics_file"]).read_text())["metrics"]
    for key in METRIC_KEYS:
        assert np.isfinite(metrics[key]), key


@needs_dataset
def test_a_flux_run_checkpoints_only_its_adapters_and_resumes(tmp_path, cache_dir):
    first = flow_run("flux", tmp_path, cache_dir, ["method=lora", "trainer.max_steps=2", "export.enabled=false"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"] and all(".lora_" in k and k.startswith("transformer.") for k in state["state_dict"])
    assert state["hyper_parameters"]["objective"]["weighting_scheme"] == "none"  # plain values: weights_only loads
    resumed = flow_run("flux", tmp_path, cache_dir, ["method=lora", "trainer.max_steps=3", "ckpt_path=last"])
    assert (first["global_step"], resumed["global_step"]) == (2, 3)
    assert (Path(resumed["pipeline"]) / "pytorch_lora_weights.safetensors").is_file()
