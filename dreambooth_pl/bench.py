"""Throughput and memory side by side: `python -m dreambooth_pl.bench` (conf/bench.yaml).

One process measures a plain PyTorch loop (the floor for framework overhead) and the Lightning trainer
with each speed option off and on, on the same model, batch and loss, then image generation. Figures
are printed as a Markdown table and written to bench.md and bench.json.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import psutil
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.training.job import build_parts
from dreambooth_pl.util.config import resolve_path
from dreambooth_pl.util.threads import use_cpu_threads

log = logging.getLogger(__name__)


class PeakMemory:
    """Peak memory over a block: CUDA max allocated on GPU, sampled process RSS on CPU (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    @contextmanager
    def watch(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        process, stop, peak = psutil.Process(), threading.Event(), [0]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak_mib = peak[0] / 2**20


class StepTimer(L.Callback):
    """Wall time of the steps after warm-up."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(pl_module.device)
        self.end = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` sets, `~key` deletes (e.g. AdamW-only arguments for another optimizer)."""
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o for o in overrides if not o.startswith("~")]))
    OmegaConf.set_struct(merged, False)
    for deletion in (o[1:] for o in overrides if o.startswith("~")):
        parent, _, key = deletion.rpartition(".")
        del OmegaConf.select(merged, parent)[key]
    return merged


def trainer_steps_per_s(cfg: DictConfig, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    parts = build_parts(cfg)
    timer = StepTimer(warmup)
    trainer = instantiate(
        cfg.trainer,
        max_steps=warmup + steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    memory = PeakMemory(device)
    with memory.watch():
        trainer.fit(parts.module, datamodule=parts.datamodule)
    return steps / (timer.end - timer.start), memory.peak_mib


def plain_loop_steps_per_s(cfg: DictConfig, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """The same module, batch and loss in a hand-written loop: no Trainer, no callbacks, no logging."""
    parts = build_parts(cfg)
    module, data = parts.module.to(device), parts.datamodule
    data.prepare_data()
    data.setup("fit")
    module.train()
    module.noise_generator = torch.Generator(device=device).manual_seed(module.seed)
    optimizer = module.optimizer_factory(params=module.parameter_groups())
    clip = cfg.trainer.get("gradient_clip_val")
    batches, done, start = iter(data.train_dataloader()), 0, None
    memory = PeakMemory(device)
    with memory.watch():
        while done < warmup + steps:
            if done == warmup:
                _sync(device)
                start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(data.train_dataloader())
                continue
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = module.compute_loss(batch).total
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module.method.after_optimizer_step(module)
            done += 1
        _sync(device)
    return steps / (time.perf_counter() - start), memory.peak_mib


def images_per_s(cfg: DictConfig, sampler: dict, count: int, device: torch.device, dtype: str | None) -> float:
    pipe = load_pipeline(resolve_path(cfg.model.pretrained), str(device), dtype, vae=cfg.model.vae)
    settings = SamplerSettings(**sampler)
    list(render(pipe, ["a teapot"] * settings.batch_size, range(settings.batch_size), settings))  # warm-up
    _sync(device)
    start = time.perf_counter()
    list(render(pipe, ["a teapot"] * count, range(count), settings))
    _sync(device)
    return count / (time.perf_counter() - start)


def run_bench(cfg: DictConfig) -> dict:
    bench = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, spec in bench.variants.items():
        vcfg = variant_config(cfg, spec.overrides)
        measure = plain_loop_steps_per_s if spec.get("plain_loop") else trainer_steps_per_s
        L.seed_everything(cfg.seed)
        steps_per_s, peak = measure(vcfg, bench.steps, bench.warmup, device)
        rows.append({"variant": name, "threads": torch.get_num_threads(), "steps_per_s": steps_per_s, "peak_mib": peak})
        log.info("%s: %d threads, %.2f steps/s, peak %.0f MiB", name, rows[-1]["threads"], steps_per_s, peak)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    generation = {}
    if bench.images:
        use_cpu_threads(cfg.cpu_threads, device.type)  # the bench's own threads, whichever variant ran last
        generation = {
            "class_images_per_s": images_per_s(cfg, sampler, bench.images, device, bench.generation_dtype),
            "eval_images_per_s": images_per_s(
                cfg, {**sampler, **bench.eval_sampler}, bench.images, device, bench.generation_dtype
            ),
        }
    reference = next((r for r in rows if r["variant"] == bench.reference), None)
    for row in rows:
        row["vs_reference"] = row["steps_per_s"] / reference["steps_per_s"] if reference else None
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": cfg.model.name,
        "resolution": cfg.model.resolution,
        "batch": f"{cfg.data.batch_size} instance + {cfg.data.batch_size if cfg.prior.enabled else 0} prior",
        "rows": rows,
        **generation,
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    table = markdown(result, bench.reference)
    (out / "bench.md").write_text(table)
    print(table)
    return result


def markdown(result: dict, reference: str) -> str:
    lines = [
        f"device: {result['device']}; model: {result['model']} at {result['resolution']} px; batch: {result['batch']}",
        "",
        f"| variant | torch threads | steps/s | vs {reference} | peak memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        ratio = f"{row['vs_reference']:.2f}x" if row["vs_reference"] else "-"
        lines.append(
            f"| {row['variant']} | {row['threads']} | {row['steps_per_s']:.2f} | {ratio} | {row['peak_mib']:.0f} |"
        )
    if "class_images_per_s" in result:
        lines += [
            "",
            f"class images/s: {result['class_images_per_s']:.2f}; eval images/s: {result['eval_images_per_s']:.2f}",
        ]
    lines.append("")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    main()
