"""The frozen model's own images of "a [class noun]", cached on disk for prior preservation.

A cache folder is keyed by everything that decides the pixels (model, prompt, sampler settings, seed),
image i always uses seed `seed + i`, and files appear only by atomic rename. So a second run generates
nothing, a killed run resumes where it stopped, and a deleted or corrupt image is simply made again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from dreambooth_pl.images import is_readable_image, save_atomically
from dreambooth_pl.models import load_pipeline
from dreambooth_pl.sampling import SamplerSettings, render

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ClassImageCache:
    def __init__(
        self,
        cache_dir: str,
        pretrained: str,
        sampler: SamplerSettings | dict,
        seed: int = 0,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.pretrained = pretrained
        self.revision = revision
        self.sampler = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings(**sampler)
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype

    def key(self, prompt: str) -> dict:
        settings = dataclasses.asdict(self.sampler)
        settings.pop("batch_size")  # batching changes pixels only by float rounding
        return {
            "pretrained": self.pretrained,
            "revision": self.revision,
            "prompt": prompt,
            "seed": self.seed,
            **settings,
        }

    def folder(self, prompt: str) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(prompt), sort_keys=True).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "_" for c in prompt)[:40]
        return self.cache_dir / f"{slug}-{digest}"

    def paths(self, prompt: str, num_images: int) -> list[Path]:
        return [self.folder(prompt) / f"{index:05d}.png" for index in range(num_images)]

    def missing(self, prompt: str, num_images: int) -> list[int]:
        return [i for i, path in enumerate(self.paths(prompt, num_images)) if not is_readable_image(path)]

    def ensure(self, prompt: str, num_images: int) -> int:
        """Generate whatever is missing; return how many images were made."""
        todo = self.missing(prompt, num_images)
        folder = self.folder(prompt)
        if not todo:
            log.info("Class images: all %d for %r are cached in %s", num_images, prompt, folder)
            return 0
        log.info("Class images: generating %d of %d for %r into %s", len(todo), num_images, prompt, folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.png"):  # temporary files of a run that was killed mid-write
            stale.unlink()
        paths = self.paths(prompt, num_images)
        pipe = self._load_pipeline()
        try:
            for position, image in render(
                pipe, [prompt] * len(todo), [self.seed + i for i in todo], self.sampler, desc="class images"
            ):
                save_atomically(image, paths[todo[position]])
                self._write_manifest(prompt, num_images)
        finally:
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return len(todo)

    def _load_pipeline(self):
        return load_pipeline(self.pretrained, self.device, self.dtype, revision=self.revision)

    def _write_manifest(self, prompt: str, num_images: int) -> None:
        folder = self.folder(prompt)
        done = sorted(p.name for p in folder.glob("*.png") if not p.name.startswith("."))
        manifest = {"key": self.key(prompt), "requested": num_images, "images": done}
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
        with os.fdopen(fd, "w") as handle:
            json.dump(manifest, handle, indent=2)
        os.replace(tmp, folder / MANIFEST)
