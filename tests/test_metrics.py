"""The evaluation metrics: hand computations on fixed embeddings, preprocessing against a PIL/numpy
reference, and tiny random DINO/CLIP stand-ins loaded through the same from_pretrained path as the real ones."""

from __future__ import annotations

import logging
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from dreambooth_pl.evaluation.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    Diversity,
    Preprocess,
    SubjectFidelity,
    TextAlignment,
    choose_div_backend,
    cosine_distance,
    lpips_distance,
    lpips_input,
    self_similarity,
    vae_feature_distance,
    warn_div_not_lpips,
)
from dreambooth_pl.models.hub import ModelNotReachable
from dreambooth_pl.text.vocab import build_clip_tokenizer, word_vocab
from dreambooth_pl.util.images import load_rgb
from tests.conftest import DREAMBOOTH_ROOT, needs_dataset

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP_STATS = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
TINY_SIZE = 32
# Sizes that match the tiny models' image_size; the real models use the config defaults (256/224, 224/224).
TINY_PREPROCESS = ["eval.dino.resize=36", "eval.dino.crop=32", "eval.clip.resize=32", "eval.clip.crop=32"]


def tiny_embedding_models(root: Path) -> dict[str, str]:
    """A random ViT (the DINO stand-in) and a random CLIP with a tiny tokenizer, saved with save_pretrained.

    Built once per folder, so test modules sharing a session folder share the models.
    """
    dino, clip = root / "tiny-dino", root / "tiny-clip"
    if not (clip / "config.json").is_file():
        vision = {"image_size": TINY_SIZE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
        layers = {"num_hidden_layers": 2, "num_attention_heads": 4}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ViTModel(ViTConfig(**vision, **layers), add_pooling_layer=False).save_pretrained(dino)
            tokenizer = build_clip_tokenizer(*word_vocab(["a", "sks", "teapot", "dog", "in", "the", "jungle", "snow"]))
            text = {
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 64,
                "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            config = CLIPConfig(text_config={**text, **layers}, vision_config={**vision, **layers}, projection_dim=16)
            CLIPModel(config).save_pretrained(clip)
            tokenizer.save_pretrained(clip)
    return {"dino": str(dino), "clip": str(clip)}


def tiny_eval_overrides(models: dict[str, str]) -> list[str]:
    return [f"eval.dino.model={models['dino']}", f"eval.clip.model={models['clip']}", *TINY_PREPROCESS]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return tiny_embedding_models(tmp_path_factory.getbasetemp() / "embedders")


def noise_images(count: int, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


# --------------------------------------------------------------------------- hand computations


def test_subject_fidelity_is_the_mean_over_all_generated_real_pairs():
    real = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    generated = torch.tensor([[1.0, 1, 0], [2.0, 0, 0]])  # not unit length: cosine, not dot product
    metric = SubjectFidelity(real)
    metric.update(generated[:1])  # in two batches: the state accumulates
    metric.update(generated[1:])
    # image 0: cosines (1/sqrt2, 1/sqrt2, 0); image 1: (1, 0, 0); 2 x 3 = 6 pairs
    expected = [math.sqrt(2) / 3, 1 / 3]
    assert metric.per_item().tolist() == pytest.approx(expected)
    assert float(metric.compute()) == pytest.approx(sum(expected) / 2)
    assert float(metric.compute()) == pytest.approx((1 / math.sqrt(2) * 2 + 1) / 6)


def test_subject_fidelity_is_symmetric_and_one_for_identical_sets():
    a, b = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), torch.randn(5, 8)
    forward, backward = SubjectFidelity(b), SubjectFidelity(a)
    forward.update(a)
    backward.update(b)
    assert float(forward.compute()) == pytest.approx(float(backward.compute()), abs=1e-6)
    same = SubjectFidelity(a[:1])
    same.update(a[:1].repeat(4, 1) * 3)
    assert float(same.compute()) == pytest.approx(1.0)


def test_real_images_oracle_uses_distinct_pairs_only():
    real = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    # pairs (0,1): 0, (0,2): 1/sqrt2, (1,2): 1/sqrt2; with self-pairs it would be (3 + 4/sqrt2) / 9
    assert self_similarity(real) == pytest.approx(math.sqrt(2) / 3)
    assert self_similarity(real[[0, 0]]) == pytest.approx(1.0)
    assert math.isnan(self_similarity(real[:1]))


def test_text_alignment_pairs_each_image_with_its_own_prompt():
    images = torch.tensor([[1.0, 0], [1, 1]])
    texts = torch.tensor([[0.0, 1], [2, 2]])
    metric = TextAlignment()
    metric.update(images, texts)
    assert metric.per_item().tolist() == pytest.approx([0.0, 1.0])
    assert float(metric.compute()) == pytest.approx(0.5)


def test_diversity_counts_distinct_pairs_within_each_prompt():
    metric = Diversity(cosine_distance)
    metric.update(torch.tensor([[1.0, 0], [0, 1], [1, 0]]))  # 3 pairs: distances 1, 0, 1
    metric.update(torch.tensor([[1.0, 0], [-1, 0]]))  # 1 pair: distance 2
    metric.update(torch.tensor([[5.0, 5]]))  # one image: no pair, adds nothing
    assert metric.per_item().tolist() == pytest.approx([2 / 3, 2.0])
    assert float(metric.compute()) == pytest.approx((2 / 3 + 2.0) / 2)
    same = Diversity(cosine_distance)
    same.update(torch.tensor([[0.3, 0.7]] * 4))
    assert float(same.compute()) == pytest.approx(0.0, abs=1e-6)
    single = Diversity(cosine_distance)
    single.update(torch.ones(1, 2))
    assert math.isnan(float(single.compute()))


def test_metric_reset_clears_the_scores():
    metric = SubjectFidelity(torch.eye(2))
    metric.update(torch.eye(2))
    metric.reset()
    assert metric.per_item().numel() == 0


# --------------------------------------------------------------------------- preprocessing


def reference(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], stats) -> torch.Tensor:
    """The torchvision recipe spelled out: Resize(short side), CenterCrop, ToTensor, Normalize."""
    array = np.asarray(image.resize(size, Image.Resampling.BICUBIC).crop(box), dtype=np.float32) / 255.0
    array = (array - np.array(stats[0], dtype=np.float32)) / np.array(stats[1], dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


@needs_dataset
def test_preprocessing_matches_a_pil_numpy_reference_on_a_dataset_photo():
    photo = load_rgb(DREAMBOOTH_ROOT / "dataset" / "teapot" / "00.jpg").resize((300, 225), Image.Resampling.BICUBIC)
    dino = Preprocess(256, 224, *IMAGENET)
    clip = Preprocess(224, 224, *CLIP_STATS)
    # landscape 300x225: short side to 256 -> 341x256 (int(256 * 300 / 225) = 341), crop at (58, 16)
    expected = reference(photo, (341, 256), (58, 16, 282, 240), IMAGENET)
    assert torch.allclose(dino.image(photo), expected, atol=1e-6)
    # portrait: the same numbers transposed
    portrait = photo.transpose(Image.Transpose.TRANSPOSE)
    assert torch.allclose(dino.image(portrait), reference(portrait, (256, 341), (16, 58, 240, 282), IMAGENET))
    # CLIP: short side 224 -> 298x224 (int(298.67)), crop at (37, 0)
    assert torch.allclose(clip.image(photo), reference(photo, (298, 224), (37, 0, 261, 224), CLIP_STATS), atol=1e-6)
    batch = dino([photo, portrait])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    # one pixel by hand: channel 0 at the crop's top-left corner
    r = np.asarray(photo.resize((341, 256), Image.Resampling.BICUBIC))[16, 58, 0]
    assert float(batch[0, 0, 0, 0]) == pytest.approx((r / 255 - 0.485) / 0.229, abs=1e-5)


def test_preprocessing_accepts_any_mode_and_square_images():
    gray = Image.new("L", (64, 64), 128)
    out = Preprocess(36, 32, [0.5] * 3, [0.5] * 3)([gray])
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.5) / 0.5), atol=1e-6)


# --------------------------------------------------------------------------- embedders


def test_identical_images_score_one_and_no_diversity(tiny_models):
    image = noise_images(1)[0]
    other = noise_images(2)[1]
    dino = DinoEmbedder(tiny_models["dino"], Preprocess(36, 32, *IMAGENET), batch_size=2)
    clip = ClipEmbedder(tiny_models["clip"], Preprocess(32, 32, *CLIP_STATS), batch_size=2)
    for embed in (dino.images, clip.images):
        copies = embed([image] * 3)
        assert copies.shape[0] == 3
        fidelity = SubjectFidelity(embed([image]))
        fidelity.update(copies)
        assert float(fidelity.compute()) == pytest.approx(1.0, abs=1e-5)
        diversity = Diversity(cosine_distance)
        diversity.update(copies)
        assert float(diversity.compute()) == pytest.approx(0.0, abs=1e-5)
        assert self_similarity(embed([image, other])) < 1.0
    texts = clip.texts(["a dog in the jungle", "a teapot", "a dog in the jungle"])
    assert texts.shape == (3, 16) and torch.allclose(texts[0], texts[2])


def test_dino_embedding_is_the_cls_token_not_the_pooler(tiny_models):
    images = noise_images(2)
    embedder = DinoEmbedder(tiny_models["dino"], Preprocess(36, 32, *IMAGENET))
    model = ViTModel.from_pretrained(tiny_models["dino"], add_pooling_layer=False).eval()
    with torch.no_grad():
        cls = model(pixel_values=embedder.preprocess(images)).last_hidden_state[:, 0]
    assert torch.allclose(embedder.images(images), cls, atol=1e-6)
    # loaded once per process: the next evaluation of a sweep (other preprocessing too) reuses the model
    assert DinoEmbedder(tiny_models["dino"], Preprocess(64, 64, *IMAGENET)).model is embedder.model


@pytest.mark.parametrize(("embedder", "option"), [(DinoEmbedder, "eval.dino.model"), (ClipEmbedder, "eval.clip.model")])
def test_unreachable_models_name_the_option_and_the_fix(embedder, option, tmp_path):
    preprocess = Preprocess(36, 32, *IMAGENET)
    with pytest.raises(ModelNotReachable, match=rf"(?s){option}=.*--local-dir /path.*set {option}=/path"):
        embedder("facebook/no-such-model-offline", preprocess)
    with pytest.raises(ModelNotReachable, match=rf"(?s){option}=.*must be a folder written by save_pretrained"):
        embedder(str(tmp_path / "missing"), preprocess)


# --------------------------------------------------------------------------- DIV backends


class FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS (which needs torchvision): mean squared difference, shaped like LPIPS output."""

    def __init__(self, net: str = "alex", verbose: bool = True):
        super().__init__()
        self.net = net
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True) * self.scale


def test_div_backend_prefers_lpips_when_it_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    assert choose_div_backend("auto") == "lpips"
    assert choose_div_backend("dino") == "dino"
    images = lpips_input([Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))])
    assert images.shape == (2, 3, 8, 8) and images.max() == 1.0 and images.min() == -1.0
    metric = Diversity(lpips_distance("alex", device="cpu"))
    metric.update(images)
    assert float(metric.compute()) == pytest.approx(4.0)  # (1 - (-1))^2


def test_div_backend_falls_back_to_dino_without_lpips(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    warn_div_not_lpips.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dreambooth_pl.evaluation.metrics"):
        assert choose_div_backend("auto") == "dino"
        assert choose_div_backend("auto") == "dino"
    assert caplog.text.count("DIV IS NOT LPIPS") == 1  # loud, once
    with pytest.raises(ImportError, match=r"eval.div.backend=lpips.*eval.div.backend=dino"):
        choose_div_backend("lpips")
    with pytest.raises(ValueError, match="eval.div.backend='clip'"):
        choose_div_backend("clip")


def test_vae_feature_distance_is_lpips_without_learned_weights(tmp_path):
    """DIV's toy backend by hand: each encoder stage's map unit-normalised over channels, the squared difference
    summed over channels, averaged over positions, then over stages; zero for an image and itself."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    distance = vae_feature_distance(str(tmp_path / "vae"), "cpu")
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert distance(a, a).tolist() == [0.0, 0.0]
    enc = vae.encoder.eval()
    with torch.no_grad():
        stages_a, stages_b = [enc.conv_in(a)], [enc.conv_in(b)]
        for block in enc.down_blocks:
            stages_a.append(block(stages_a[-1]))
            stages_b.append(block(stages_b[-1]))
    per_stage = []
    for fa, fb in zip(stages_a, stages_b):
        unit_a = fa / fa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit_b = fb / fb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        per_stage.append(((unit_a - unit_b) ** 2).sum(1).mean((1, 2)))
    assert distance(a, b).tolist() == pytest.approx(torch.stack(per_stage).mean(0).tolist(), rel=1e-5)
    assert len(per_stage) == 3 and choose_div_backend("vae") == "vae"
    with pytest.raises(ValueError, match="use auto, lpips, dino or vae"):
        choose_div_backend("clip")
