"""torch's CPU threads, set from the `cpu_threads` option by every entry point that computes (docs/speed.md,
"Threads"): with one thread a step keeps its speed when other processes hold cores, where torch's default (one
per core) spin-waits for them, and a process's numbers do not depend on the machine's cores."""

from __future__ import annotations

import torch

from dreambooth_pl.util.config import ConfigError


def cpu_threads_problems(threads, option: str = "cpu_threads") -> list[str]:
    """A thread count torch takes: a whole number >= 1, or None for torch's default."""
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return []
    return [f"{option}={threads} must be >= 1 (or null for torch's default)"]


def use_cpu_threads(threads: int | None, device: str | None = None, option: str = "cpu_threads") -> None:
    """Use `threads` intra-op threads when the work runs on the CPU. `device`: where it runs, a torch device or
    Lightning accelerator ("cpu", "cuda:0", "gpu"; None and "auto": CUDA when available); a GPU process keeps
    torch's default. The inter-op pool is left alone: it serves only torch.jit.fork, which nothing here calls."""
    if problems := cpu_threads_problems(threads, option):
        raise ConfigError(problems[0])
    on_gpu = str(device or "auto").split(":")[0] != "cpu" and torch.cuda.is_available()
    if threads is not None and not on_gpu:
        torch.set_num_threads(threads)
