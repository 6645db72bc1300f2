"""The toy world's pretraining set: captioned renders of random instances (cached, not shipped), and the
words its captions use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dreambooth_pl.toyworld import scenes


@dataclass
class WorldData:
    """The rendered pretraining set: `views` photos of each instance, each with its own caption."""

    images: np.ndarray  # N x H x W x 3 uint8
    captions: list[str]
    instance: np.ndarray  # N: which instance each image shows (views of one instance are adjacent)
    cls: np.ndarray  # N: index into scenes.CLASSES
    context: np.ndarray  # N: index into scenes.CONTEXTS
    colour: np.ndarray  # N: index into the colour names, or -1 when the caption names no colour

    def pixels(self, index) -> torch.Tensor:
        """Images as the models take them: N x 3 x H x W in [-1, 1]."""
        return torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_world(
    num_instances: int, views: int, size: int, colour_word_prob: float, plain_prob: float, seed: int
) -> WorldData:
    """Each instance is photographed `views` times in random contexts, never in a held-out (class, context)."""
    rng = np.random.default_rng(seed)
    held_out = scenes.held_out_pairs()
    colours = list(scenes.COLOURS)
    images, captions, inst_ids, cls_ids, ctx_ids, col_ids = [], [], [], [], [], []
    for i in tqdm(range(num_instances), desc="render world", unit="inst", mininterval=5):
        inst = scenes.sample_instance(rng)
        allowed = [c for c in scenes.CONTEXTS[1:] if (inst.cls, c) not in held_out]
        for _ in range(views):
            context = "" if rng.random() < plain_prob else allowed[rng.integers(len(allowed))]
            named = rng.random() < colour_word_prob
            images.append(np.asarray(scenes.render(inst, scenes.sample_view(rng, context), size)))
            captions.append(scenes.caption(inst.cls, context, inst.colour if named else None))
            inst_ids.append(i)
            cls_ids.append(scenes.CLASSES.index(inst.cls))
            ctx_ids.append(scenes.CONTEXTS.index(context))
            col_ids.append(colours.index(inst.colour) if named else -1)
    return WorldData(np.stack(images), captions, *(np.asarray(a) for a in (inst_ids, cls_ids, ctx_ids, col_ids)))


def load_or_render_world(cache_dir: str, spec: dict) -> WorldData:
    """Rendering takes minutes, so the set is cached under a name that hashes its spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"world-{digest}.npz"
    if path.exists():
        with np.load(path) as f:
            return WorldData(
                f["images"], [str(c) for c in f["captions"]], f["instance"], f["cls"], f["context"], f["colour"]
            )
    data = render_world(**spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=data.images,
        captions=np.asarray(data.captions),
        instance=data.instance,
        cls=data.cls,
        context=data.context,
        colour=data.colour,
    )
    tmp.replace(path)
    return data


def world_words(extra_words: list[str]) -> list[str]:
    """Every word a caption or a toy evaluation prompt uses, then the extra (never captioned) words."""
    words = ["a", *scenes.COLOURS, *scenes.CLASSES]
    for context in scenes.CONTEXTS:
        words += context.split()
    seen = dict.fromkeys(words)
    clash = [w for w in extra_words if w in seen]
    if clash:
        raise ValueError(f"toyworld.tokenizer.extra_words {clash} appear in captions: identifiers must be rare")
    return [*seen, *extra_words]
