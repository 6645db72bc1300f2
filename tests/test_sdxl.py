"""SDXL through the model-family seam, on the tiny random-weight SDXL model (model=sdxl_tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageOps
from safetensors.torch import load_file

from dreambooth_pl.models.families import get_family
from dreambooth_pl.models.pipelines import load_components, load_pipeline
from dreambooth_pl.training.data import DreamBoothDataset, collate
from dreambooth_pl.training.job import train
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.util.config import resolve_path
from dreambooth_pl.util.images import ImageTransform
from tests.conftest import FAST, compose_train, needs_dataset
from tests.test_methods import render, run

SDXL_FAST = [*FAST, "model=sdxl_tiny"]
PROMPT = "a sks teapot in the snow"


@pytest.fixture(scope="session")
def sdxl_tiny(cache_dir) -> str:
    return resolve_path(compose_train(SDXL_FAST, cache_dir / "unused", cache_dir).model.pretrained)


def sdxl_module(pretrained: str, **kwargs) -> DreamBoothModule:
    return DreamBoothModule(pretrained, optimizer=torch.optim.AdamW, family="sdxl", **kwargs).eval()


def photos(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def mixed_batch(tmp_path: Path, center_crop: bool = False, random_flip: bool = True) -> tuple[dict, list]:
    """Two instance and two class images, each of its own size, through the real dataset and collate;
    also the four source images, in batch order."""
    instance, classes = photos([(96, 64), (64, 80)], 0), photos([(128, 70), (70, 100)], 1)  # (width, height)
    class_paths = []
    for index, image in enumerate(classes):
        class_paths.append(tmp_path / f"class{index}.png")
        image.save(class_paths[-1])
    transform = ImageTransform(64, center_crop=center_crop, random_flip=random_flip)
    dataset = DreamBoothDataset(instance, ["a sks teapot"], transform, class_paths, "a teapot")
    return collate([dataset[(i, 1000 + i)] for i in range(2)]), [*instance, *classes]


def seen_crop(image: Image.Image, top: int, left: int, flipped: bool) -> torch.Tensor:
    """What the model sees for a crop at (top, left) of the image resized to 64 px on its short side,
    mirrored first when flipped: SDXL's crop coordinates are those of the image as seen."""
    scale = 64 / min(image.size)
    resized = image.resize((max(64, round(image.width * scale)), max(64, round(image.height * scale))), Image.BICUBIC)
    if flipped:
        resized = ImageOps.mirror(resized)
    array = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_prompts_become_both_encoders_penultimate_states_and_the_second_pooled(sdxl_tiny):
    parts = load_components(sdxl_tiny, family="sdxl")
    prompts = ["a sks teapot", "a teapot on the beach"]
    with torch.no_grad():
        got = get_family("sdxl").encode_prompts(parts.tokenizers, parts.text_encoders, prompts)
        states, pooled = [], None
        for tok, enc in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out.text_embeds  # the second encoder's projection of its pooled output
    assert got.hidden_states.shape == (2, 77, 64)  # 32 + 32 channels side by side
    assert torch.equal(got.hidden_states, torch.cat(states, dim=-1))
    assert torch.equal(got.pooled, pooled)
    assert not torch.equal(states[1], out.last_hidden_state)  # penultimate, not the last layer


@pytest.mark.parametrize("center_crop, random_flip", [(False, True), (True, True), (True, False)])
def test_time_ids_are_each_images_own_size_and_crop(sdxl_tiny, tmp_path, center_crop, random_flip):
    batch, images = mixed_batch(tmp_path, center_crop, random_flip)
    module = sdxl_module(sdxl_tiny)
    seen = {}
    module.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.update(kwargs["added_cond_kwargs"]), with_kwargs=True
    )
    module.compute_loss(batch)
    rows = seen["time_ids"].long().tolist()
    flips = []
    for row, image, pixels in zip(rows, images, batch["pixel_values"], strict=True):
        height, width, top, left, target_height, target_width = row
        assert (height, width) == (image.height, image.width)  # its own original size, class images too
        assert (target_height, target_width) == (64, 64)
        matches = [f for f in (False, True) if torch.allclose(seen_crop(image, top, left, f), pixels, atol=1e-5)]
        assert matches, f"time ids {row} do not name the crop the model sees"
        flips.append(matches[0])
    if random_flip:
        assert True in flips  # a mirrored view is among them (seeded), with its crop corner mirrored too
    if not center_crop:
        assert any(row[2] or row[3] for row in rows)


def test_text_embeddings_are_cached_while_the_encoders_are_frozen(sdxl_tiny, tmp_path):
    batch, _images = mixed_batch(tmp_path)
    module = sdxl_module(sdxl_tiny)
    calls = []
    for encoder in module.text_encoders.values():
        encoder.register_forward_hook(lambda *_: calls.append(1))
    first = module.encode_prompts(batch["prompts"])
    assert len(calls) == 2  # each encoder once, for both distinct prompts together
    again = module.encode_prompts(batch["prompts"])
    assert len(calls) == 2
    assert torch.equal(first.hidden_states, again.hidden_states) and torch.equal(first.pooled, again.pooled)
    fresh = module._run_text_encoders(batch["prompts"])
    assert torch.allclose(fresh.hidden_states, first.hidden_states, atol=1e-6)
    assert torch.allclose(fresh.pooled, first.pooled, atol=1e-6)


def reference_loss(parts, batch: dict, noise, timesteps, prior_loss_weight: float, resolution: int) -> torch.Tensor:
    """The training step of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (frozen text
    encoders, prior preservation, no SNR weighting, no EDM), transcribed: its encode_prompt (every
    encoder's hidden_states[-2] concatenated, pooled output of the last), compute_time_ids
    (original size + crop top-left + target size), latents x scaling_factor, and instance MSE plus
    prior_loss_weight x prior MSE over the two halves of the batch."""
    prompts = batch["prompts"]
    prompt_embeds_list = []
    for tokenizer, text_encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        text_input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        prompt_embeds = text_encoder(text_input_ids, output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = prompt_embeds[0]
        prompt_embeds = prompt_embeds[-1][-2]
        bs_embed, seq_len, _ = prompt_embeds.shape
        prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    pooled_prompt_embeds = pooled_prompt_embeds.view(bs_embed, -1)

    def compute_time_ids(original_size, crops_coords_top_left):
        target_size = (resolution, resolution)
        return torch.tensor([list(original_size + crops_coords_top_left + target_size)])

    model_input = parts.vae.encode(batch["pixel_values"]).latent_dist.sample() * parts.vae.config.scaling_factor
    noisy_model_input = parts.noise_scheduler.add_noise(model_input, noise, timesteps)
    sizes = [tuple(s) for s in batch["original_sizes"].tolist()]
    crops = [tuple(c) for c in batch["crops_top_left"].tolist()]
    add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in zip(sizes, crops, strict=True)])
    model_pred = parts.unet(
        noisy_model_input,
        timesteps,
        prompt_embeds,
        added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds},
        return_dict=False,
    )[0]
    if parts.noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = parts.noise_scheduler.get_velocity(model_input, noise, timesteps)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return loss + prior_loss_weight * prior_loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_loss_equals_the_diffusers_sdxl_script(sdxl_tiny, tmp_path, prediction_type):
    batch, _images = mixed_batch(tmp_path)
    module = sdxl_module(sdxl_tiny, prior_weight=0.7)
    parts = load_components(sdxl_tiny, family="sdxl")
    for scheduler in (module.noise_scheduler, parts.noise_scheduler):
        scheduler.register_to_config(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 300, 650, 990])
    torch.manual_seed(7)  # the latent sample draws from the global generator in both
    ours = module.compute_loss(batch, noise=noise, timesteps=timesteps)
    torch.manual_seed(7)
    with torch.no_grad():
        theirs = reference_loss(parts, batch, noise, timesteps, 0.7, 64)
    assert ours.total.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert ours.prior is not None and ours.prior.item() > 0


# --------------------------------------------------------------------------- training and exports


def sdxl_run(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> dict:
    return run(tmp_path, cache_dir, ["model=sdxl_tiny", *overrides])


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory, cache_dir) -> dict:
    """Full fine-tuning with both text encoders, a sample grid at step 2, final samples via `generate`."""
    root = tmp_path_factory.mktemp("sdxl-dreambooth")
    cfg = compose_train(
        [
            *SDXL_FAST,
            "trainer.max_steps=3",
            "method.train_text_encoder=true",
            "callbacks.samples.every_n_steps=2",
            "export.samples.prompts=['a {identifier} {class_noun}']",
        ],
        root,
        cache_dir,
    )
    return {**train(cfg), "base": resolve_path(cfg.model.pretrained), "cfg": cfg, "root": root}


@needs_dataset
def test_full_fine_tune_exports_a_pipeline_diffusers_loads(dreambooth_run, cache_dir):
    result = dreambooth_run
    module = result["module"].eval()
    pipe = StableDiffusionXLPipeline.from_pretrained(result["pipeline"])
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for (key, a), b in zip(getattr(module, name).state_dict().items(), getattr(pipe, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    assert np.abs(render(pipe, PROMPT) - render(module.pipeline(), PROMPT)).max() < 1e-4
    base = load_components(result["base"], family="sdxl")
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.parameters(), pipe.unet.parameters()))
    # class images were made by the SDXL pipeline, keyed by the SDXL model
    manifests = [json.loads(m.read_text()) for m in (cache_dir / "class_images").glob("*/manifest.json")]
    made = [m for m in manifests if m["key"]["pretrained"] == result["base"]]
    assert made and len(made[0]["images"]) == 4
    # sample grids during training and the final samples (`generate` on the export) are SDXL renders
    grids = sorted((result["root"] / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000003.png"]
    final = Image.open(result["root"] / "final_samples" / "p00_00.png")
    assert final.size == (64, 64) and np.asarray(final).std() > 0
    assert (result["root"] / "final_samples" / "grid.png").is_file()


@needs_dataset
def test_lora_on_unet_and_both_text_encoders_loads_with_its_alpha(tmp_path, cache_dir):
    overrides = ["method=lora", "method.alpha=8", "method.train_text_encoder=true", "trainer.max_steps=6"]
    result = sdxl_run(tmp_path, cache_dir, [*overrides, "module.optimizer.lr=1e-2"])
    weights = load_file(Path(result["pipeline"]) / "pytorch_lora_weights.safetensors")
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in weights), prefix
    module = result["module"].eval()
    pipe = StableDiffusionXLPipeline.from_pretrained(result["base"])
    pipe.load_lora_weights(result["pipeline"])
    trained = module.pipeline()
    prompts = ["a sks teapot"]
    with torch.no_grad():
        ours = get_family("sdxl").encode_prompts(module.tokenizers, module.text_encoders, prompts)
        theirs = get_family("sdxl").encode_prompts(
            {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2},
            {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
            prompts,
        )
    assert torch.allclose(ours.hidden_states, theirs.hidden_states, atol=1e-4)
    assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-4)
    assert np.abs(render(pipe, PROMPT) - render(trained, PROMPT)).max() < 1e-4
    base = render(StableDiffusionXLPipeline.from_pretrained(result["base"]), PROMPT)
    assert np.abs(render(trained, PROMPT) - base).max() > 1e-3  # the adapters matter


@needs_dataset
def test_textual_inversion_learns_one_embedding_per_encoder(tmp_path, cache_dir):
    result = sdxl_run(
        tmp_path, cache_dir, ["method=textual_inversion", "trainer.max_steps=4", "module.optimizer.lr=1e-2"]
    )
    module = result["module"].eval()
    base = load_components(result["base"], family="sdxl")
    folder = Path(result["pipeline"])
    pipe = StableDiffusionXLPipeline.from_pretrained(result["base"])
    pipe.load_textual_inversion(str(folder), weight_name="learned_embeds.safetensors")
    pipe.load_textual_inversion(
        str(folder),
        weight_name="learned_embeds_2.safetensors",
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        token_id = module.tokenizers[tokenizer].convert_tokens_to_ids("<sks>")
        assert token_id == len(getattr(base, tokenizer))
        learned = getattr(module, encoder).get_input_embeddings().weight
        assert torch.equal(learned[:token_id], getattr(base, encoder).get_input_embeddings().weight)
        fresh = getattr(pipe, tokenizer).convert_tokens_to_ids("<sks>")
        assert torch.allclose(getattr(pipe, encoder).get_input_embeddings().weight[fresh], learned[token_id])
    assert not torch.equal(  # both rows learned
        module.text_encoder_2.get_input_embeddings().weight[-1],
        base.text_encoder_2.get_input_embeddings()
        .weight[base.tokenizer_2("teapot", add_special_tokens=False).input_ids]
        .mean(0),
    )
    ours = render(module.pipeline(), "a <sks> teapot")
    assert np.abs(render(pipe, "a <sks> teapot") - ours).max() < 1e-4
    assert np.abs(render(load_pipeline(str(folder), device="cpu"), "a <sks> teapot") - ours).max() < 1e-4


@needs_dataset
def test_evaluation_scores_the_sdxl_export(dreambooth_run, tmp_path):
    from dreambooth_pl.evaluation.evaluate import evaluate_run
    from tests.test_evaluate import METRIC_KEYS, QUICK, TEAPOT, compose_eval
    from tests.test_metrics import tiny_embedding_models, tiny_eval_overrides

    tiny = tiny_eval_overrides(tiny_embedding_models(tmp_path / "embedders"))
    eval_cfg = compose_eval([*tiny, *QUICK, "eval.images_per_prompt=2"]).eval
    result = evaluate_run(
        dreambooth_run["pipeline"],
        str(tmp_path),
        eval_cfg,
        str(TEAPOT),
        "teapot",
        "teapot",
        dreambooth_run["identifier"],
    )
    assert result["generated"] == 2 * 2 + 2  # 2 prompts x 2 images, 2 PRES images
    metrics = json.loads(Path(result["metrics_file"]).read_text())["metrics"]
    for key in METRIC_KEYS:
        assert np.isfinite(metrics[key]), key
    assert Image.open(tmp_path / "eval" / "images" / "p00_00.png").size == (64, 64)  # the model's native size


@needs_dataset
def test_separate_vae_is_trained_with_kept_fp32_under_bf16_and_travels_with_the_export(sdxl_tiny, tmp_path, cache_dir):
    vae = load_components(sdxl_tiny, family="sdxl").vae
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(1.01)
    vae.save_pretrained(tmp_path / "vae")
    overrides = ["method=lora", f"model.vae={tmp_path / 'vae'}", "trainer.precision=bf16-mixed", "trainer.max_steps=2"]
    result = sdxl_run(tmp_path / "run", cache_dir, overrides)
    module = result["module"]
    assert module.vae.dtype == torch.float32  # force_upcast: not rounded to bf16 with the other frozen weights
    assert module.unet.conv_in.weight.dtype == torch.bfloat16
    for a, b in zip(vae.parameters(), module.vae.parameters(), strict=True):
        assert torch.equal(a, b)
    info = json.loads((Path(result["pipeline"]) / "dreambooth.json").read_text())
    assert info["base_vae"] == str(tmp_path / "vae")
    loaded = load_pipeline(result["pipeline"], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), loaded.vae.parameters(), strict=True))
    keys = [json.loads(m.read_text())["key"] for m in (cache_dir / "class_images").glob("*/manifest.json")]
    assert any(k.get("vae") == str(tmp_path / "vae") for k in keys)  # class images decoded by that VAE


def test_sdxl_configs_are_consistent(tmp_path):
    """model=sdxl_random is the published SDXL base architecture; its widths must fit together."""
    cfg = compose_train(["model=sdxl_random"], tmp_path, tmp_path)
    spec = cfg.model.pretrained
    first, second = spec.text_encoders.text_encoder, spec.text_encoders.text_encoder_2
    assert spec.unet.cross_attention_dim == first.hidden_size + second.hidden_size == 2048
    assert spec.unet.projection_class_embeddings_input_dim == 6 * spec.unet.addition_time_embed_dim + 1280
    assert second.projection_dim == 1280 and spec.unet.transformer_layers_per_block == [1, 2, 10]
    assert (cfg.model.family, cfg.model.resolution, cfg.module.family) == ("sdxl", 1024, "sdxl")
    hub = compose_train(["model=sdxl", "model.vae=madebyollin/sdxl-vae-fp16-fix"], tmp_path, tmp_path)
    assert hub.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0" and hub.model.resolution == 1024
    assert hub.module.vae == hub.prior.cache.vae == "madebyollin/sdxl-vae-fp16-fix"
    tiny = compose_train(SDXL_FAST, tmp_path, tmp_path).model.pretrained
    assert tiny.unet.projection_class_embeddings_input_dim == 6 * tiny.unet.addition_time_embed_dim + 32
