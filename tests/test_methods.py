"""LoRA and Textual Inversion beside full fine-tuning: what learns, what is exported, what diffusers loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_pl.models.pipelines import load_components, load_pipeline
from dreambooth_pl.models.sampling import use_scheduler
from dreambooth_pl.training.job import train
from dreambooth_pl.util.config import resolve_path
from tests.conftest import FAST, compose_train, needs_dataset

pytestmark = needs_dataset
PROMPT = "a sks teapot in the snow"


def render(pipe, prompt: str, **kwargs) -> np.ndarray:
    """Deterministic DDIM steps, whatever scheduler the pipeline came with (an export keeps the base's)."""
    use_scheduler(pipe, "diffusers.DDIMScheduler")
    return pipe(
        prompt,
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images[0]


def run(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> dict:
    cfg = compose_train([*FAST, "export.samples.prompts=[]", *overrides], tmp_path, cache_dir)
    return {**train(cfg), "base": resolve_path(cfg.model.pretrained), "cfg": cfg}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir):
    """rank 4, alpha 8: an export that forgets alpha loads at half the trained scale."""
    overrides = ["method=lora", "method.alpha=8", "trainer.max_steps=20", "module.optimizer.lr=1e-2"]
    return run(tmp_path_factory.mktemp("lora"), cache_dir, overrides)


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([100, 700]), hidden).sample


def text_output(pipe_or_module, prompt: str = PROMPT) -> torch.Tensor:
    ids = pipe_or_module.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe_or_module.text_encoder(ids)[0]


def test_lora_export_keeps_the_alpha_scale(lora_run):
    """The reloaded UNet computes what the training-time UNet computed, for rank != alpha."""
    module = lora_run["module"].eval()
    trained = unet_output(module.unet)
    loaded = unet_output(load_pipeline(lora_run["pipeline"], device="cpu").unet)
    base = unet_output(load_components(lora_run["base"]).unet)
    change = (trained - base).abs().max().item()
    assert change > 1e-2  # the adapters matter
    assert (loaded - trained).abs().max().item() < 1e-5 * max(1.0, trained.abs().max().item())


def test_lora_trains_only_adapters(lora_run):
    """Every adapter moved from its initial value (the run's seed rebuilds them: peft draws lora_A at random,
    so comparing with zero would pass untrained); every base weight is the base model's."""
    import lightning as L

    from dreambooth_pl.training.job import build_parts

    L.seed_everything(lora_run["cfg"].seed, workers=True)
    initial = dict(build_parts(lora_run["cfg"]).module.unet.named_parameters())
    base = load_components(lora_run["base"])
    trained = lora_run["module"]
    base_params = dict(base.unet.named_parameters())
    adapters = [name for name, param in trained.unet.named_parameters() if param.requires_grad]
    assert adapters and all("lora_" in name for name in adapters)
    assert all(not initial[n].any() for n in adapters if "lora_B" in n)  # peft starts lora_B at zero
    assert [n for n in adapters if torch.equal(trained.unet.get_parameter(n), initial[n])] == []
    for name, param in trained.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_params[name.replace(".base_layer", "")]), name
    for a, b in zip(base.vae.parameters(), trained.vae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lora_trainable_count_is_rank_times_in_plus_out(lora_run):
    rank = lora_run["cfg"].method.rank
    targets = tuple(lora_run["cfg"].method.target_modules)
    base = load_components(lora_run["base"])
    expected = sum(
        rank * (m.in_features + m.out_features)
        for name, m in base.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(targets)
    )
    trainable = sum(p.numel() for p in lora_run["module"].trainable_parameters())
    assert trainable == expected
    assert trainable < 0.1 * sum(p.numel() for p in base.unet.parameters())


def test_lora_export_reproduces_the_trained_model(lora_run, tmp_path):
    folder = Path(lora_run["pipeline"])
    assert folder.name == "lora" and (folder / "pytorch_lora_weights.safetensors").exists()
    module = lora_run["module"].eval()
    trained = render(module.pipeline(), PROMPT)
    loaded = load_pipeline(str(folder), device="cpu")
    assert np.abs(render(loaded, PROMPT) - trained).max() < 1e-4
    base = render(load_pipeline(lora_run["base"], device="cpu"), PROMPT)
    assert np.abs(render(loaded, PROMPT, cross_attention_kwargs={"scale": 0.0}) - base).max() < 1e-4
    assert np.abs(trained - base).max() > 1e-3  # the adapters do change the output

    lora_bytes = (folder / "pytorch_lora_weights.safetensors").stat().st_size
    full_bytes = sum(p.stat().st_size for p in Path(lora_run["base"]).glob("unet/*.safetensors"))
    print(f"LoRA export {lora_bytes} B vs full UNet {full_bytes} B ({lora_bytes / full_bytes:.3f})")
    assert lora_bytes < 0.1 * full_bytes


def test_lora_on_the_text_encoder_too(tmp_path, cache_dir):
    overrides = ["method=lora", "method.alpha=2", "method.train_text_encoder=true", "method.export_merged=true"]
    result = run(tmp_path, cache_dir, [*overrides, "trainer.max_steps=8", "module.optimizer.lr=1e-2"])
    weights = load_file(Path(result["pipeline"]) / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    module = result["module"].eval()
    loaded = load_pipeline(result["pipeline"], device="cpu")
    merged = load_pipeline(str(tmp_path / "pipeline"), device="cpu")  # export_merged: a plain pipeline
    base = load_components(result["base"])
    trained_text, trained_unet = text_output(module.pipeline()), unet_output(module.unet)
    assert (trained_text - text_output(base)).abs().max() > 1e-3  # the text adapters matter
    for pipe in (loaded, merged):
        assert (text_output(pipe) - trained_text).abs().max() < 1e-4
        assert (unet_output(pipe.unet) - trained_unet).abs().max() < 1e-4
    assert np.abs(render(merged, PROMPT) - render(module.pipeline(), PROMPT)).max() < 1e-3


def test_textual_inversion_learns_one_embedding_row(tmp_path, cache_dir):
    result = run(tmp_path, cache_dir, ["method=textual_inversion", "trainer.max_steps=4", "module.optimizer.lr=1e-2"])
    # the diffusers example's recipe: its templates without the class noun, lr scaled by 4 accumulated images
    assert "a photo of a <sks>" in result["instance"] and not any("teapot" in p for p in result["instance"])
    assert result["module"].trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(4e-2)
    assert result["module"].trainer.accumulate_grad_batches == 4
    base = load_components(result["base"])
    module = result["module"]
    token_id = module.tokenizers["tokenizer"].convert_tokens_to_ids("<sks>")
    assert token_id == len(base.tokenizer)  # a new token at the end of the vocabulary
    init = (
        base.text_encoder.get_input_embeddings()
        .weight[base.tokenizer("teapot", add_special_tokens=False).input_ids]
        .mean(0)
    )
    learned = module.text_encoder.get_input_embeddings().weight
    assert not torch.allclose(learned[token_id], init)  # it learned
    assert torch.equal(learned[:token_id], base.text_encoder.get_input_embeddings().weight)  # bit-identical
    for model in ("unet", "vae"):
        for a, b in zip(getattr(base, model).parameters(), getattr(module, model).parameters(), strict=True):
            assert torch.equal(a, b)
    base_te = dict(base.text_encoder.named_parameters())
    for name, param in module.text_encoder.named_parameters():
        if "token_embedding" not in name:
            assert torch.equal(param, base_te[name]), name

    folder = Path(result["pipeline"])
    assert folder.name == "textual_inversion"
    assert set(load_file(folder / "learned_embeds.safetensors")) == {"<sks>"}
    pipe = load_pipeline(str(folder), device="cpu")  # a fresh base pipeline + load_textual_inversion
    fresh_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[fresh_id], learned[token_id])
    assert pipe.tokenizer("a <sks> teapot", add_special_tokens=False).input_ids[1] == fresh_id
    assert np.abs(render(pipe, "a <sks> teapot") - render(module.eval().pipeline(), "a <sks> teapot")).max() < 1e-4


def test_full_fine_tuning_with_the_text_encoder(tmp_path, cache_dir):
    result = run(tmp_path, cache_dir, ["method.train_text_encoder=true", "trainer.max_steps=3"])
    base = load_components(result["base"])
    exported = load_components(result["pipeline"])
    te_changed = any(
        not torch.equal(a, b)
        for a, b in zip(base.text_encoder.parameters(), exported.text_encoder.parameters(), strict=True)
    )
    assert te_changed
    assert all(torch.equal(a, b) for a, b in zip(base.vae.parameters(), exported.vae.parameters(), strict=True))


def test_lora_export_folds_alpha_into_every_target_not_only_attention(tmp_path, cache_dir):
    """A target outside attention (the transformer blocks' 1x1 `proj_in`) has no diffusers name, so the file
    keeps peft's `lora_B` names; alpha / rank must be folded into every one, or it loads at rank / alpha of
    the trained scale. Every adapter must load: both targets change what the loaded UNet computes."""
    overrides = ["method=lora", "method.alpha=8", "method.target_modules=[to_q,proj_in]", "module.optimizer.lr=1e-2"]
    result = run(tmp_path, cache_dir, [*overrides, "trainer.max_steps=6"])
    weights = load_file(Path(result["pipeline"]) / "pytorch_lora_weights.safetensors")
    assert any("proj_in.lora_B" in k for k in weights) and any("to_q.lora_B" in k for k in weights)
    trained = unet_output(result["module"].eval().unet)
    loaded = load_pipeline(result["pipeline"], device="cpu").unet
    assert {type(m).__name__ for n, m in loaded.named_modules() if n.endswith(("to_q", "proj_in"))} == {
        "Linear",
        "Conv2d",
    }
    assert all(hasattr(m, "lora_B") for n, m in loaded.named_modules() if n.endswith(("to_q", "proj_in")))
    assert (trained - unet_output(loaded)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "model, expected",
    [
        ("sdxl_tiny", [(1e-4, 1e-4), (5e-6, 1e-3)]),  # train_dreambooth_lora_sdxl.py's recipe
        ("tiny", [(1e-4, 1e-2), (1e-4, 1e-2)]),  # no per-part recipe: one lr and weight decay
    ],
)
def test_text_encoder_adapters_learn_at_their_own_rate_and_weight_decay(tmp_path, cache_dir, model, expected):
    from dreambooth_pl.training.job import build_parts

    cfg = compose_train([*FAST, f"model={model}", "method=lora", "method.train_text_encoder=true"], tmp_path, cache_dir)
    module = build_parts(cfg).module
    optimizer = module.configure_optimizers()["optimizer"]
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == expected
    text = {id(p) for e in module.text_encoders.values() for p in e.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == text
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
    for p in module.trainable_parameters():
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    # AdamW's first step by hand: p (1 - lr wd) - lr g / (|g| + eps), with the bias-corrected moments g, g^2
    for group, old in zip(optimizer.param_groups, before, strict=True):
        lr, wd = group["lr"], group["weight_decay"]
        for p, p0 in zip(group["params"], old, strict=True):
            assert torch.allclose(p, p0 * (1 - lr * wd) - lr * 0.5 / (0.5 + 1e-8), atol=1e-9, rtol=0)
