"""What the pretraining stages share: their batches, optimizer and training loop, and saving a model whole."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dreambooth_pl.runs.export import write_dir_atomically
from dreambooth_pl.toyworld.world import WorldData


def plain(cfg: DictConfig) -> dict:
    """Model constructors store their arguments as JSON config: they need plain lists, not ListConfig."""
    return OmegaConf.to_container(cfg, resolve=True)


def batches(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> Iterator[np.ndarray]:
    for _ in range(steps):
        yield rng.integers(0, n, batch_size)


def optimizer(params, lr: float, steps: int, warmup: int):
    """AdamW with linear warm-up and cosine decay: short runs still end at a low learning rate."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def caption_batches(rng: np.random.Generator, data: WorldData, cfg: DictConfig) -> Iterator[np.ndarray]:
    """A stage's batches of rendered (image, caption) indices."""
    return batches(rng, len(data.captions), cfg.batch_size, cfg.steps)


def train_loop(name: str, model: torch.nn.Module, loss_fn, batches, cfg: DictConfig) -> list[float]:
    """The shared loop over a stage's `steps` at its `lr` and `warmup`: returns the loss of every step (the
    tests check that it falls)."""
    steps = cfg.steps
    opt, sched = optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, steps, cfg.warmup)
    model.train()
    losses = []
    bar = tqdm(batches, total=steps, desc=name, unit="step", mininterval=10)
    for index in bar:
        loss = loss_fn(index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    model.eval()
    return losses


def save_model(model, target: Path, tokenizer=None) -> None:
    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    write_dir_atomically(target, write)
