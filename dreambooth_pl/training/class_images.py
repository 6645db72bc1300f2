"""The frozen model's own images of "a [class noun]", cached on disk for prior preservation.

A cache folder is keyed by everything that decides the pixels (the model's contents, prompt, sampler
settings, seed, device type and dtype),
image i always uses seed `seed + i`, and files appear only by atomic rename. So a second run generates
nothing, a killed run resumes where it stopped, and a deleted or corrupt image is simply made again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from dreambooth_pl.models.hub import model_fingerprint
from dreambooth_pl.models.pipelines import loaded_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.util.files import ProcessLock, write_json_atomically
from dreambooth_pl.util.images import is_readable_image, save_atomically

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_EVERY = 100  # images between manifest rewrites during generation


class ClassImageCache:
    def __init__(
        self,
        cache_dir: str,
        pretrained: str,
        sampler: SamplerSettings | dict,
        seed: int = 0,
        revision: str | None = None,
        variant: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        vae: str | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.vae = vae
        self.pretrained = pretrained
        self.revision = revision
        self.variant = variant
        self.sampler = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings(**sampler)
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # half precision on a GPU, full on a CPU (where half-precision convolutions are slow or missing)
        self.dtype = dtype or ("float16" if torch.device(self.device).type == "cuda" else "float32")

    def key(self, prompt: str) -> dict:
        settings = dataclasses.asdict(self.sampler)
        settings.pop("batch_size")  # batching changes pixels only by float rounding
        return {
            "pretrained": self.pretrained,
            "fingerprint": model_fingerprint(self.pretrained),
            "revision": self.revision,
            "variant": self.variant,
            "device": torch.device(self.device).type,
            "dtype": self.dtype,
            "prompt": prompt,
            "seed": self.seed,
            **settings,
            # a separate VAE decodes the pixels (keyed only when set: existing caches keep their folders)
            **({"vae": self.vae, "vae_fingerprint": model_fingerprint(self.vae)} if self.vae else {}),
        }

    def folder(self, prompt: str) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(prompt), sort_keys=True).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() else "_" for c in prompt)[:40]
        return self.cache_dir / f"{slug}-{digest}"

    def paths(self, prompt: str, num_images: int) -> list[Path]:
        return [self.folder(prompt) / f"{index:05d}.png" for index in range(num_images)]

    def missing(self, prompt: str, num_images: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Indices without a readable image, among those `rank` of `world_size` is responsible for."""
        paths = self.paths(prompt, num_images)
        return [i for i in range(rank, num_images, world_size) if not is_readable_image(paths[i])]

    def ensure(self, prompt: str, num_images: int, rank: int = 0, world_size: int = 1) -> int:
        """Generate whatever is missing; return how many images this process made.

        Under distributed training every rank calls this with its global rank and makes the missing
        images i with i % world_size == rank: no image is made twice and image i still comes from seed + i.
        Ranks touch only their own files (temporary ones included). A single process rewrites the manifest
        every MANIFEST_EVERY images and at the end; with several, one rank calls `write_manifest` once all
        have finished, since concurrent snapshots of the folder could replace a fuller manifest with an older one.
        """
        folder = self.folder(prompt)
        folder.mkdir(parents=True, exist_ok=True)
        # One process per share of a folder generates; another run needing the same images waits on the
        # lock and then finds them made. Only the lock holder clears temporary files, so none in flight is.
        with ProcessLock(folder / f".lock-{rank}-of-{world_size}", f"the class images {prompt!r}"):
            return self._generate_missing(prompt, num_images, rank, world_size)

    def _generate_missing(self, prompt: str, num_images: int, rank: int, world_size: int) -> int:
        todo = self.missing(prompt, num_images, rank, world_size)
        folder = self.folder(prompt)
        share = "" if world_size == 1 else f" (rank {rank} of {world_size})"
        if not todo:
            log.info("Class images: all %d for %r are cached in %s%s", num_images, prompt, folder, share)
            if world_size == 1 and not self.manifest_lists(prompt, num_images):
                log.warning("Class images: %s is missing or damaged; rewriting it", folder / MANIFEST)
                self.write_manifest(prompt, num_images)
            return 0
        log.info("Class images: generating %d of %d for %r into %s%s", len(todo), num_images, prompt, folder, share)
        for stale in folder.glob(".*.png"):  # temporary files of a run that was killed mid-write
            if _temp_file_index(stale) % world_size == rank:
                stale.unlink(missing_ok=True)
        paths = self.paths(prompt, num_images)
        with loaded_pipeline(self.pretrained, self.device, self.dtype, self.revision, self.variant, self.vae) as pipe:
            for position, image in render(
                pipe, [prompt] * len(todo), [self.seed + i for i in todo], self.sampler, desc="class images"
            ):
                save_atomically(image, paths[todo[position]])
                # the manifest is only a record (images are found by their files): rewriting it after
                # every image would cost more than the image itself in a folder of many thousands
                if world_size == 1 and (position + 1) % MANIFEST_EVERY == 0:
                    self.write_manifest(prompt, num_images)
        if world_size == 1:
            self.write_manifest(prompt, num_images)
        return len(todo)

    def manifest_lists(self, prompt: str, num_images: int) -> bool:
        """Whether the manifest reads whole and lists the first `num_images` images (a record that a disk
        error or a hand edit damaged is rebuilt rather than left to mislead whoever reads it)."""
        try:
            manifest = json.loads((self.folder(prompt) / MANIFEST).read_text())
            return {p.name for p in self.paths(prompt, num_images)} <= set(manifest["images"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write_manifest(self, prompt: str, num_images: int) -> None:
        """Record the key and the images present; files appear by atomic rename, so readers see a whole one."""
        folder = self.folder(prompt)
        done = sorted(p.name for p in folder.glob("*.png") if not p.name.startswith("."))
        manifest = {"key": self.key(prompt), "requested": num_images, "images": done}
        write_json_atomically(manifest, folder / MANIFEST)


def _temp_file_index(path: Path) -> int:
    """The image index in a temporary name `.<index>-<random>.png` (see `save_atomically`); 0 if there is none."""
    stem = path.name[1:].split("-", 1)[0]
    return int(stem) if stem.isdigit() else 0
