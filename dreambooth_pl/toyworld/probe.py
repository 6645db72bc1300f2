"""The probe stage: does the base model follow text it never saw as a whole? Read back by the toy CLIP
(`CaptionReader`) and by an attribute classifier trained on rendered images (`AttributeProbe`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import CLIPModel, CLIPTokenizer

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.loop import caption_batches, train_loop
from dreambooth_pl.toyworld.world import WorldData
from dreambooth_pl.util.images import image_grid, save_atomically


class AttributeProbe(torch.nn.Module):
    """A small CNN trained on rendered images to name class, context and colour: the renderer's known
    attributes, read back from generated images. Trained with blur, since generated images are blurrier."""

    def __init__(self, width: int):
        super().__init__()
        widths = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        sizes = (len(scenes.CLASSES), len(scenes.CONTEXTS), len(scenes.COLOURS))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(widths[-1], n) for n in sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        return [head(features) for head in self.heads]

    @torch.no_grad()
    def read(self, images) -> list[tuple[str, str, str]]:
        pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        logits = self(pixels.float() / 127.5 - 1.0)
        cls, ctx, col = (lg.argmax(-1).tolist() for lg in logits)
        names = list(scenes.COLOURS)
        return [(scenes.CLASSES[a], scenes.CONTEXTS[b], names[c]) for a, b, c in zip(cls, ctx, col)]


def train_attribute_probe(data: WorldData, cfg: DictConfig, seed: int) -> AttributeProbe:
    torch.manual_seed(seed)
    model = AttributeProbe(cfg.width)
    rng = np.random.default_rng(seed)
    labels = [torch.from_numpy(a).long() for a in (data.cls, data.context, data.colour)]

    def loss_fn(index):
        x = data.pixels(index)
        blur = torch.from_numpy(rng.random(len(index)) < 0.5)
        x[blur] = F.interpolate(F.avg_pool2d(x[blur], 2), scale_factor=2, mode="bilinear")
        logits = model(x)
        # the colour is known only where the caption names it (-1 elsewhere)
        return sum(F.cross_entropy(lg, lb[index], ignore_index=-1) for lg, lb in zip(logits, labels))

    losses = train_loop("attribute probe", model, loss_fn, caption_batches(rng, data, cfg), cfg)
    model.losses = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]  # first and last 10 steps
    return model


def probe(data: WorldData, attribute_probe: AttributeProbe, cfg: DictConfig, out: Path, seed: int) -> dict:
    """Does the base model follow text it never saw as a whole? Generate each held-out (class, context)
    pair in a few colours and read class, context and colour back, with the toy CLIP (zero-shot) and with
    an attribute probe trained on rendered images, beside the same readings of the renderer's own images
    of those prompts (each reader's ceiling)."""
    rng = np.random.default_rng(seed)
    colours = list(scenes.COLOURS)
    prompts, truth = [], []
    for cls, context in sorted(scenes.held_out_pairs()):
        for colour in rng.choice(colours, cfg.colours_per_pair, replace=False):
            prompts.append(scenes.caption(cls, context, str(colour)))
            truth.append((cls, context, str(colour)))
    prompts_rep = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    truth_rep = [t for t in truth for _ in range(cfg.images_per_prompt)]
    settings = SamplerSettings(**cfg.sampler)
    with torch.no_grad():
        pipe = load_pipeline(str(out / "pipeline"), device="cpu")
        seeds = [seed + i for i in range(len(prompts_rep))]
        generated = [image for _, image in render(pipe, prompts_rep, seeds, settings, desc="probe")]
        del pipe
    rendered = []
    for cls, context, colour in truth_rep:
        inst = scenes.sample_instance(rng, cls).recoloured(colour)
        rendered.append(scenes.render(inst, scenes.sample_view(rng, context), settings.resolution))
    result = {
        "prompts": len(prompts),
        "images": len(prompts_rep),
        "chance": {
            "class": 1 / len(scenes.CLASSES),
            "context": 1 / (len(scenes.CONTEXTS) - 1),
            "colour": 1 / len(colours),
        },
        "probe_loss": attribute_probe.losses,
    }
    for reader_name, reader in (("clip", CaptionReader(out / "clip")), ("attribute_probe", attribute_probe)):
        for name, images in (("generated", generated), ("rendered", rendered)):
            read = reader.read(images)
            result[f"{reader_name}/{name}"] = {
                attr: float(np.mean([r[k] == t[k] for r, t in zip(read, truth_rep)]))
                for k, attr in enumerate(("class", "context", "colour"))
            }
    (out / "probe").mkdir(parents=True, exist_ok=True)
    (out / "probe" / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = cfg.images_per_prompt
    rows = [generated[i * cols : (i + 1) * cols] + rendered[i * cols : i * cols + 1] for i in range(len(prompts))]
    save_atomically(
        image_grid([im for row in rows[:: cfg.grid_every] for im in row], cols=cols + 1), out / "probe" / "grid.png"
    )
    (out / "probe" / "grid.txt").write_text("\n".join(prompts[:: cfg.grid_every]) + "\n")
    return result


class CaptionReader:
    """Zero-shot reading with the toy CLIP: the best of every class x context x colour caption."""

    def __init__(self, clip_dir: Path):
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.tok = CLIPTokenizer.from_pretrained(clip_dir)
        self.options = [
            (cls, ctx, col) for cls in scenes.CLASSES for ctx in scenes.CONTEXTS[1:] for col in scenes.COLOURS
        ]
        tokens = self.tok(
            [scenes.caption(*o[:2], o[2]) for o in self.options],
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            text = self.model.get_text_features(**tokens)
        self.text = F.normalize(text if isinstance(text, torch.Tensor) else text.pooler_output, dim=-1)

    @torch.no_grad()
    def read(self, images) -> list[tuple[str, str, str]]:
        pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        feats = self.model.get_image_features(pixel_values=pixels.float() / 127.5 - 1.0)
        feats = F.normalize(feats if isinstance(feats, torch.Tensor) else feats.pooler_output, dim=-1)
        return [self.options[i] for i in (feats @ self.text.T).argmax(-1).tolist()]
