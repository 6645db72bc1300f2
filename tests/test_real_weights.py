"""What only shows on real weights: frozen T5 in eval mode, text-encoder adapters that learn under gradient
checkpointing, parity with the diffusers scripts in train mode (loss and every gradient), LoRA files other
tools read by key name, exports in the base's dtype, alpha = rank, CLIP-T's class noun, what FSDP and
FLUX-dev's dynamic shifting do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from dreambooth_pl.checks import check_config, family_problems
from dreambooth_pl.models.families import Components
from dreambooth_pl.models.objectives import FlowMatching
from dreambooth_pl.models.pipelines import inference_dtype, load_components, load_pipeline, stored_dtype
from dreambooth_pl.runs.export import LORA_KOHYA_WEIGHTS, LORA_WEIGHTS
from dreambooth_pl.training.methods import LoRA
from dreambooth_pl.training.module import DreamBoothModule
from dreambooth_pl.util.config import ConfigError, resolve_path
from tests.conftest import FAST, compose_train, needs_dataset
from tests.test_flow import (  # noqa: F401 (flux_tiny, sd3_tiny: fixtures)
    flux_reference_loss,
    flux_tiny,
    module_for,
    sd3_reference_loss,
    sd3_tiny,
    tiny_cfg,
)
from tests.test_methods import run, text_output, unet_output
from tests.test_sdxl import mixed_batch

# the text encoders FLUX / SD3 train with train_text_encoder (the scripts' text_encoder_one / _two), and T5
TRAINED = {"flux": ["text_encoder"], "sd3": ["text_encoder", "text_encoder_2"]}
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


def te_lora_module(family: str, pretrained: str, cache_dir: Path, **kwargs) -> DreamBoothModule:
    """The family's LoRA recipe (its model file's targets) with the CLIP adapters on, in train mode."""
    method = instantiate(tiny_cfg(family, cache_dir, ["method=lora", "method.train_text_encoder=true"]).method)
    return module_for(family, pretrained, cache_dir, method=method, **kwargs).train()


def pretrained_of(family: str, request) -> str:
    return request.getfixturevalue(f"{family}_tiny")


# --------------------------------------------------------------------------- T5 stays frozen and eval


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_only_encoders_that_learn_go_to_train_mode(family, method, request, cache_dir):
    """T5 has dropout 0.1: in train mode two encodings of one prompt differ (noisy conditioning)."""
    overrides = [f"method={method}", "method.train_text_encoder=true"]
    chosen = instantiate(tiny_cfg(family, cache_dir, overrides).method)
    module = module_for(family, pretrained_of(family, request), cache_dir, method=chosen).train()
    assert module.text_encoders[T5[family]].config.dropout_rate > 0  # what makes the mode matter
    assert {n: e.training for n, e in module.text_encoders.items()} == {
        **{name: True for name in TRAINED[family]},
        T5[family]: False,
    }
    first, second = (module.encode_prompts(["a sks teapot"]) for _ in range(2))
    assert torch.equal(first.hidden_states, second.hidden_states)


# --------------------------------------------------------------------------- adapters learn under checkpointing


@pytest.fixture
def transformers4_checkpointing(monkeypatch):
    """transformers 4.x's defaults (pyproject allows >= 4.41): reentrant checkpointing unless told otherwise,
    and no grad-requiring inputs for adapters injected by peft itself (only transformers' own peft
    integration turned them on). transformers 5 changed both, which hid the bug here."""
    original = PreTrainedModel._activation_checkpointing_enable

    def enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        original(self, activation_checkpointing_kwargs or {"use_reentrant": True}, *args, **kwargs)
        if hasattr(self, "_require_grads_hook"):
            self.disable_input_require_grads()

    monkeypatch.setattr(PreTrainedModel, "_activation_checkpointing_enable", enable)


def test_every_text_encoder_adapter_learns_with_gradient_checkpointing(
    sd3_tiny, cache_dir, tmp_path, transformers4_checkpointing
):
    module = te_lora_module("sd3", sd3_tiny, cache_dir, gradient_checkpointing=True)
    assert all(module.text_encoders[n].is_gradient_checkpointing for n in TRAINED["sd3"])
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    text = [n for n in adapters if n.startswith(tuple(f"{e}." for e in TRAINED["sd3"]))]
    assert text and all(".lora_" in n for n in text)
    initial = {n: p.detach().clone() for n, p in adapters.items()}
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-3, weight_decay=0.0)
    batch, _ = mixed_batch(tmp_path)
    module.noise_generator = torch.Generator().manual_seed(0)
    for step in range(2):  # lora_B starts at zero, so lora_A gets its first gradient at the second step
        module.compute_loss(batch).total.backward()
        if step == 0:
            learning = [n for n in text if "lora_B" in n]
            assert all(adapters[n].grad is not None and adapters[n].grad.abs().max() > 0 for n in learning)
        optimizer.step()
        optimizer.zero_grad()
    unmoved = [n for n, p in adapters.items() if torch.equal(p, initial[n])]
    assert not [n for n in unmoved if n in text]
    assert all(n.startswith(discarded_queries(module)) for n in unmoved)


# --------------------------------------------------------------------------- parity in train mode, gradients


def discarded_queries(module: DreamBoothModule) -> tuple[str, ...]:
    """Adapters without any gradient by construction: SD3's last block (context_pre_only) discards its
    context tokens' outputs, which are all its context queries reach."""
    if module.family.denoiser_class.__name__ != "SD3Transformer2DModel":
        return ()
    last = len(module.denoiser.transformer_blocks) - 1
    return (f"transformer.transformer_blocks.{last}.attn.add_q_proj.",)


def script_modes(parts: Components, family: str) -> None:
    """The scripts' modes: transformer.train(), text_encoder_one (/ _two).train(); T5 as loaded (eval)."""
    parts.denoiser.train()
    for name in TRAINED[family]:
        parts.text_encoders[name].train()
    parts.text_encoders[T5[family]].eval()


def gradients(module: DreamBoothModule, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_train_mode_step_with_text_encoder_lora_matches_the_script_loss_and_gradients(
    family, request, cache_dir, tmp_path
):
    """Our step and the script's transcription on the same modules, text-encoder LoRA on, each in the modes
    its code sets; every trainable parameter's gradient must agree, not only the loss. lora_B starts at
    zero, which would make every lora_A gradient zero on both sides: it is set at random first. SD3 runs
    at the shipped T5 length (256), not the script's 77."""
    module = te_lora_module(family, pretrained_of(family, request), cache_dir, prior_weight=0.7)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    batch, _ = mixed_batch(tmp_path)
    module.noise_generator = torch.Generator().manual_seed(11)
    ours = module.compute_loss(batch).total
    our_grads = gradients(module, ours)

    parts = Components(
        module.denoiser, module.vae, module.noise_scheduler, module.text_encoders, module.tokenizers, "transformer"
    )
    script_modes(parts, family)
    torch.manual_seed(11)
    length = module.family.max_sequence_length
    if family == "flux":
        theirs = flux_reference_loss(parts, batch, 0.7, 3.5, length, "none", 1.29)
    else:
        assert length == 256
        theirs = sd3_reference_loss(parts, batch, 0.7, length, "logit_normal", True)
    their_grads = gradients(module, theirs)

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert set(our_grads) == set(their_grads) and any(n.startswith("text_encoder.") for n in our_grads)
    for name, grad in our_grads.items():  # a comparison of zeros proves nothing
        assert (grad.abs().max() > 0) != name.startswith(discarded_queries(module)), name
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6 * grad.abs().max().item())


# --------------------------------------------------------------------------- alpha follows rank


def test_lora_alpha_follows_the_rank_unless_set(tiny_pretrained, tmp_path):
    """The diffusers LoRA scripts use alpha = rank (scale 1): rank 16 must not train at a quarter scale."""
    for overrides, alpha in ((["method.rank=16"], 16), (["method.rank=16", "method.alpha=8"], 8)):
        cfg = compose_train([*FAST, "method=lora", *overrides], tmp_path, tmp_path)
        method = instantiate(cfg.method)
        assert (method.rank, method.alpha) == (16, alpha)
        module = DreamBoothModule(tiny_pretrained, optimizer=torch.optim.AdamW, method=method)
        scales = {m.scaling["default"] for m in module.unet.modules() if hasattr(m, "lora_B")}
        assert scales == {alpha / 16}


# --------------------------------------------------------------------------- LoRA files other tools read


def merge_by_key_name(kohya: dict[str, torch.Tensor], models: dict[str, torch.nn.Module]) -> None:
    """What Automatic1111 / ComfyUI / kohya do with a kohya file: find each layer by its key (prefix + the
    layer's transformers-4 / diffusers name with dots as underscores) and add alpha / rank x up @ down.
    transformers 4's CLIPTextModel names every layer under `text_model.`, transformers 5's does not."""
    layers = {}
    for prefix, model in models.items():
        level = "" if hasattr(model, "text_model") or prefix == "lora_unet" else "text_model."
        for name, layer in model.named_modules():
            layers[f"{prefix}_{(level + name).replace('.', '_')}"] = layer
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and {k.split(".")[0] for k in kohya} <= set(layers)  # no key dropped
    with torch.no_grad():
        for key in downs:
            name = key.split(".")[0]
            down, up = kohya[key], kohya[f"{name}.lora_up.weight"]
            layers[name].weight += kohya[f"{name}.alpha"] / len(down) * up @ down


@needs_dataset
def test_lora_files_use_the_usual_names_and_a_kohya_file_loads_by_key_name(tmp_path, cache_dir):
    overrides = ["method=lora", "method.alpha=8", "method.train_text_encoder=true", "method.export_kohya=true"]
    result = run(tmp_path, cache_dir, [*overrides, "trainer.max_steps=4", "module.optimizer.lr=1e-2"])
    folder = Path(result["pipeline"])
    text_keys = [k for k in load_file(folder / LORA_WEIGHTS) if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    kohya = load_file(folder / LORA_KOHYA_WEIGHTS)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in kohya)
    fresh = load_components(result["base"])
    merge_by_key_name(kohya, {"lora_unet": fresh.unet, "lora_te1": fresh.text_encoder})
    module = result["module"].eval()
    assert (text_output(fresh) - text_output(module.pipeline())).abs().max() < 1e-4
    assert (unet_output(fresh.unet) - unet_output(module.unet)).abs().max() < 1e-4
    assert (text_output(load_components(result["base"])) - text_output(fresh)).abs().max() > 1e-3  # it trained


def refusals(tmp_path: Path, overrides: list[str]) -> str:
    return " ".join(family_problems(compose_train([*FAST, *overrides], tmp_path, tmp_path)))


def test_kohya_files_are_refused_on_flow_families(tmp_path):
    for family in ("flux", "sd3"):
        message = refusals(tmp_path, [f"model={family}_tiny", "method=lora", "method.export_kohya=true"])
        assert "export_kohya=true is offered for SD and SDXL" in message
    assert refusals(tmp_path, ["model=sdxl_tiny", "method=lora", "method.export_kohya=true"]) == ""


def test_fsdp_is_refused_where_one_unit_would_gather_everything(tmp_path):
    for family in ("flux", "sd3"):
        assert "trainer=fsdp is refused" in refusals(tmp_path, [f"model={family}_tiny", "trainer=fsdp"])
    assert refusals(tmp_path, ["model=sdxl_tiny", "trainer=fsdp"]) == ""


# --------------------------------------------------------------------------- exports in the base's dtype


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, cache_dir) -> str:
    """The tiny model stored in bf16, as FLUX.1-dev is."""
    tiny = compose_train(FAST, cache_dir / "unused", cache_dir).model.pretrained
    pipe = load_pipeline(resolve_path(tiny), "cpu", "bfloat16")
    folder = tmp_path_factory.mktemp("bf16") / "base"
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


PARTS = ("unet", "vae", "text_encoder")


def part_dtypes(folder: Path) -> dict[str, set[torch.dtype]]:
    return {p: {t.dtype for t in load_file(next((folder / p).glob("*.safetensors"))).values()} for p in PARTS}


def test_exports_keep_a_bf16_base_in_bf16(bf16_base, tmp_path):
    module = DreamBoothModule(bf16_base, optimizer=torch.optim.AdamW)
    with torch.no_grad():
        module.unet.conv_in.weight.add_(0.25)  # what a training step would have learned
    folder = Path(module.method.export(module, tmp_path / "run", {}))
    assert part_dtypes(folder) == {p: {torch.bfloat16} for p in PARTS}
    exported = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(bf16_base) / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(exported["conv_in.weight"], module.unet.conv_in.weight.to(torch.bfloat16))
    assert all(torch.equal(exported[k], base[k]) for k in base if k != "conv_in.weight")
    assert stored_dtype(bf16_base) == "bfloat16"
    upcast = Path(module.method.export(module, tmp_path / "fp32", {}, dtype="float32"))
    assert part_dtypes(upcast)["unet"] == {torch.float32}  # export.dtype=float32 asks for it

    lora = LoRA(export_merged=True)
    module = DreamBoothModule(bf16_base, optimizer=torch.optim.AdamW, method=lora)
    lora.export(module, tmp_path / "lora", {"base_model": bf16_base})
    assert part_dtypes(tmp_path / "lora" / "pipeline") == {p: {torch.bfloat16} for p in PARTS}


def test_stored_dtype_reads_the_denoisers_weights_and_variant(tmp_path, tiny_pretrained):
    folder = tmp_path / "model"
    shutil.copytree(tiny_pretrained, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() for k, v in load_file(weights).items()}
    save_file(half, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert stored_dtype(str(folder)) == "float32"  # not the fp16 variant beside it
    assert stored_dtype(str(folder), variant="fp16") == "float16"


def test_models_are_evaluated_in_their_stored_dtype_on_a_gpu(bf16_base):
    """FLUX.1-dev (bf16) was rendered in fp32 by default: twice the memory and time on a GPU."""
    assert inference_dtype(bf16_base, "cuda") == "bfloat16"
    assert inference_dtype(bf16_base, "cuda", "float16") == "float16"  # eval.dtype where set
    assert inference_dtype(bf16_base, "cpu") is None  # diffusers' fp32: CPUs compute bf16 slowly


@needs_dataset
def test_export_dtype_option_end_to_end(tmp_path, cache_dir):
    result = run(tmp_path, cache_dir, ["export.dtype=bfloat16", "trainer.max_steps=1"])
    assert part_dtypes(Path(result["pipeline"]))["unet"] == {torch.bfloat16}
    with pytest.raises(ConfigError, match="export.dtype='fp8': use null"):
        check_config(compose_train([*FAST, "export.dtype=fp8"], tmp_path, cache_dir))


# --------------------------------------------------------------------------- CLIP-T text per class-noun condition


@pytest.mark.parametrize("taught, condition", [("teapot", "correct"), ("", "none"), ("dog", "wrong")])
def test_clip_t_scores_the_subjects_real_class(tmp_path, taught, condition):
    from dreambooth_pl.evaluation.protocol import subject_prompts
    from dreambooth_pl.evaluation.record import class_noun_condition

    prompts_file = tmp_path / "prompts_and_classes.txt"
    lines = ["Object Prompts", "'a {0} {1} in the jungle'.format(unique_token, class_token),"]
    lines += ["Live Subject Prompts", "'a {0} {1} on the beach'.format(unique_token, class_token),"]
    prompts_file.write_text("\n".join(lines))
    _, (prompt,) = subject_prompts(prompts_file, "teapot", "sks", taught)
    assert class_noun_condition("teapot", taught) == condition
    assert prompt.text == " ".join(["a sks", *([taught] if taught else []), "in the jungle"])
    assert prompt.clip_text == "a teapot in the jungle"


# --------------------------------------------------------------------------- FLUX-dev's dynamic shifting


def test_flux_dev_training_sigmas_are_unshifted_as_in_the_script(tmp_path):
    """FLUX.1-dev's scheduler has use_dynamic_shifting (and shift 3): diffusers' training reads its sigmas
    as they are, (1000 - i) / 1000, with neither the static shift nor the resolution-dependent one."""
    config = OmegaConf.to_container(tiny_cfg("flux", tmp_path).model.pretrained.scheduler)
    assert config["use_dynamic_shifting"] and config["shift"] == 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    objective = FlowMatching(scheduler)
    indices = torch.tensor([0, 250, 500, 999])
    noisy = objective.add_noise(torch.ones(4, 4, 2, 2), torch.zeros(4, 4, 2, 2), scheduler.timesteps[indices])
    expected = 1 - (1000 - indices.float()) / 1000
    assert torch.allclose(noisy[:, 0, 0, 0], expected, atol=1e-6)
    script = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config).sigmas[indices]  # noise_scheduler_copy
    assert torch.allclose(1 - noisy[:, 0, 0, 0], script, atol=1e-6)
