"""The paper's evaluation metrics (Ruiz et al. 2023, sec. 4.1 and Table 3) as torchmetrics.

The metrics work on embeddings, so they can be checked by hand on fixed vectors; the embedders turn
images and text into those vectors with the paper's models (DINO ViT-S/16, CLIP ViT-B/32). Scores
are raw cosine similarities, the paper's scale. Preprocessing is PIL + numpy (no torchvision), and
follows the reference pipelines: resize the short side (bicubic), centre crop, normalise.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dreambooth_pl.models.hub import ModelNotReachable, download_hint

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metrics


class _PerItemMean(Metric):
    """Keeps one score per item, so per-image scores can be reported beside the mean."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def per_item(self) -> Tensor:
        return dim_zero_cat(self.scores) if self.scores else torch.empty(0)

    def compute(self) -> Tensor:
        scores = self.per_item()
        return scores.mean() if scores.numel() else torch.tensor(float("nan"))


class SubjectFidelity(_PerItemMean):
    """Mean cosine between each generated image and every real image of the subject.

    DINO and CLIP-I with the matching embedder, and PRES with DINO on images of the bare class prompt.
    An image's score is its mean over the real images, so the mean of the scores is the mean over all
    n_generated x n_real pairs.
    """

    def __init__(self, reference: Tensor, **kwargs):
        super().__init__(**kwargs)
        if len(reference) == 0:
            raise ValueError("SubjectFidelity needs at least one reference embedding.")
        self.reference = F.normalize(reference.detach().float().cpu(), dim=-1)

    def update(self, embeddings: Tensor) -> None:
        self.scores.append((F.normalize(embeddings.detach().float().cpu(), dim=-1) @ self.reference.T).mean(dim=1))


class TextAlignment(_PerItemMean):
    """CLIP-T: cosine between each image and its own prompt."""

    def update(self, image_embeddings: Tensor, text_embeddings: Tensor) -> None:
        self.scores.append(
            F.cosine_similarity(image_embeddings.detach().float(), text_embeddings.detach().float()).cpu()
        )


class Diversity(_PerItemMean):
    """DIV: distance between distinct pairs of images generated for the same prompt.

    `distance(a, b)` gives one distance per row pair: LPIPS on images, or 1 - cosine on DINO features.
    Call `update` once per prompt with that prompt's images (or features); its score is the mean over its
    pairs, and DIV is the mean over prompts (the mean over all pairs, as every prompt has as many images).
    A prompt with a single image has no pair and adds nothing.
    """

    def __init__(self, distance: Callable[[Tensor, Tensor], Tensor], **kwargs):
        super().__init__(**kwargs)
        self.distance = distance

    def update(self, group: Tensor) -> None:
        first, second = torch.triu_indices(len(group), len(group), offset=1)
        if len(first):
            self.scores.append(self.distance(group[first], group[second]).detach().float().mean().reshape(1).cpu())


def self_similarity(embeddings: Tensor) -> float:
    """The Real Images row of Table 1: mean cosine over distinct pairs of real images (no image with itself)."""
    if len(embeddings) < 2:
        return float("nan")
    unit = F.normalize(embeddings.detach().float().cpu(), dim=-1)
    first, second = torch.triu_indices(len(unit), len(unit), offset=1)
    return float((unit[first] * unit[second]).sum(-1).mean())


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """The DIV fallback without LPIPS: 1 - cosine of DINO features."""
    return 1 - F.cosine_similarity(a, b)


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Short side to `resize` (bicubic), centre crop `crop`, scale to [0, 1], normalise by mean/std.

    Sizes and rounding follow torchvision's Resize(int) and CenterCrop, which DINO and CLIP used.
    """

    resize: int
    crop: int
    mean: Sequence[float]
    std: Sequence[float]

    def image(self, image: Image.Image) -> Tensor:
        width, height = image.size
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        array = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self.image(image) for image in images])


# --------------------------------------------------------------------------- embedders


def _from_pretrained(cls, model_id: str, option: str, **kwargs):
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except Exception as err:  # a truncated weights file raises safetensors' own error, not an OSError
        if Path(model_id).expanduser().is_dir() and (Path(model_id).expanduser() / "config.json").is_file():
            raise ModelNotReachable(
                f"{option}={model_id!r} is a damaged model folder: its weights cannot be read "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}). Copy the model folder again."
            ) from None
        if not isinstance(err, OSError):
            raise
        if model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists():
            hint = f"{option}={model_id!r} must be a folder written by save_pretrained (config and weights)."
        else:
            hint = download_hint(option, model_id)
        raise ModelNotReachable(f"Could not load {option}={model_id!r}: {err}\n{hint}") from err


@functools.lru_cache(maxsize=4)
def _embedding_model(cls, model_id: str, option: str, device: torch.device, **kwargs):
    """Loaded once per process: a sweep's evaluations (and its base-model evaluation) share the embedders."""
    return _from_pretrained(cls, model_id, option, **kwargs).to(device).eval()


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _features(output) -> Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with pooler_output in 5."""
    return output if isinstance(output, Tensor) else output.pooler_output


class DinoEmbedder:
    """DINO ViT-S/16 image features: the CLS token of the last layer (after the final norm), never the pooler."""

    def __init__(
        self,
        model: str,
        preprocess: Preprocess,
        batch_size: int = 32,
        device: str | None = None,
        option: str = "eval.dino.model",
    ):
        from transformers import ViTModel

        self.device = _default_device(device)
        self.model = _embedding_model(ViTModel, model, option, self.device, add_pooling_layer=False)
        self.preprocess = preprocess
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        interpolate = self.preprocess.crop != self.model.config.image_size
        chunks = [
            self.model(
                pixel_values=self.preprocess(images[i : i + self.batch_size]).to(self.device),
                interpolate_pos_encoding=interpolate,
            ).last_hidden_state[:, 0]
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).float().cpu()


class ClipEmbedder:
    """CLIP image and text embeddings in the joint space (after the projections)."""

    def __init__(
        self,
        model: str,
        preprocess: Preprocess,
        batch_size: int = 32,
        device: str | None = None,
        option: str = "eval.clip.model",
    ):
        from transformers import AutoTokenizer, CLIPModel

        self.device = _default_device(device)
        self.model = _embedding_model(CLIPModel, model, option, self.device)
        self.tokenizer = _from_pretrained(AutoTokenizer, model, option)
        self.preprocess = preprocess
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        interpolate = self.preprocess.crop != self.model.config.vision_config.image_size
        chunks = [
            _features(
                self.model.get_image_features(
                    pixel_values=self.preprocess(images[i : i + self.batch_size]).to(self.device),
                    interpolate_pos_encoding=interpolate,
                )
            )
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).float().cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(_features(self.model.get_text_features(**tokens)))
        return torch.cat(chunks).float().cpu()


# --------------------------------------------------------------------------- DIV backends


def lpips_unavailable_reason() -> str | None:
    """None when LPIPS can be used; otherwise why not (lpips needs torchvision, which may not import)."""
    try:
        importlib.import_module("lpips")
    except Exception as err:  # a broken torchvision raises RuntimeError, not ImportError
        return f"{type(err).__name__}: {err}"
    return None


def choose_div_backend(backend: str) -> str:
    """auto -> lpips when it imports, else dino; an explicit lpips that cannot import is an error; vae is
    the LPIPS-style distance on a VAE encoder's feature maps (`vae_feature_distance`)."""
    if backend not in ("auto", "lpips", "dino", "vae"):
        raise ValueError(f"eval.div.backend={backend!r}: use auto, lpips, dino or vae.")
    if backend == "vae":
        return "vae"
    if backend == "dino":
        warn_div_not_lpips()
        return "dino"
    reason = lpips_unavailable_reason()
    if reason is None:
        return "lpips"
    if backend == "lpips":
        raise ImportError(
            f"eval.div.backend=lpips but lpips cannot be imported ({reason}). "
            'Install it with `pip install -e ".[lpips]"` (it needs torchvision), or set eval.div.backend=dino.'
        )
    warn_div_not_lpips(reason)
    return "dino"


@functools.cache
def warn_div_not_lpips(reason: str | None = None) -> None:
    """Once per process and loudly: a DIV that is not LPIPS sits next to the paper's LPIPS numbers."""
    log.warning(
        "DIV IS NOT LPIPS in this evaluation: it is 1 - cosine of DINO features (%s). Its scale differs from "
        'the paper\'s LPIPS DIV (0.391 / 0.371): compare directions only. For LPIPS: pip install -e ".[lpips]" '
        "(needs torchvision) and eval.div.backend=lpips.",
        f"lpips unavailable: {reason}" if reason else "eval.div.backend=dino",
    )


def lpips_distance(net: str = "alex", device: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS (Zhang et al. 2018) between image batches in [-1, 1]."""
    import lpips

    target = _default_device(device)
    try:
        model = lpips.LPIPS(net=net, verbose=False).to(target).eval()
    except OSError as err:  # the backbone's weights come from torchvision's download cache
        raise ModelNotReachable(
            f"LPIPS (eval.div.lpips_net={net!r}) could not load its backbone weights: {err}\n"
            "Put them in the torch hub cache ($TORCH_HOME) or set eval.div.backend=dino."
        ) from err

    @torch.no_grad()
    def distance(a: Tensor, b: Tensor) -> Tensor:
        return model(a.to(target), b.to(target)).flatten().cpu()

    return distance


def vae_feature_distance(vae_path: str, device: str | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS's recipe without its learned weights, on a VAE encoder (the toy world's, which saw every pose,
    layout and background): each stage's feature map unit-normalised over channels, the squared difference
    averaged over positions, then over stages. Unlike DINO, which is trained to map every view of an object
    to one point, it sees where things are, so it can read DIV's pose and layout diversity."""
    from diffusers import AutoencoderKL

    target = _default_device(device)
    encoder = _from_pretrained(AutoencoderKL, vae_path, "eval.div.vae").encoder.to(target).eval()

    def features(x: Tensor) -> list[Tensor]:
        maps = [encoder.conv_in(x)]
        for block in encoder.down_blocks:
            maps.append(block(maps[-1]))
        return [F.normalize(m, dim=1) for m in maps]

    @torch.no_grad()
    def distance(a: Tensor, b: Tensor) -> Tensor:
        pairs = zip(features(a.to(target)), features(b.to(target)))
        return torch.stack([(fa - fb).pow(2).sum(1).mean((1, 2)) for fa, fb in pairs]).mean(0).cpu()

    return distance


def lpips_input(images: Sequence[Image.Image]) -> Tensor:
    """Images as LPIPS expects them: RGB in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
