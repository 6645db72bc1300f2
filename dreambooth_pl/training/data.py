"""Instance and prior images, interleaved so that every batch holds both halves."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dreambooth_pl.training.class_images import ClassImageCache
from dreambooth_pl.util.images import ImageFolderError, ImageTransform, list_images, load_rgb

log = logging.getLogger(__name__)
SMALL_NAMES_SHOWN = 5  # photos named in the warning about photos below the training resolution
# Cheap statistics on 128 px greyscale copies. Roughness, the mean difference between neighbouring pixels over
# the image's spread, is about 0.95 for random noise and at most about 0.45 on the DreamBooth dataset's photos.
NOISE_ROUGHNESS = 0.7
# Mean absolute difference (0-1) on 32 px copies under which two photos count as the same picture; distinct
# views of one toy-world subject differ by 0.05 or more.
DUPLICATE_DIFFERENCE = 0.02


def load_instance_images(folder: str, resolution: int, skip_unreadable: bool = False) -> list[Image.Image]:
    """Decode the subject's photos up front, so a bad file is reported before any model is loaded."""
    images, small, names = [], [], []
    for path in list_images(folder):
        try:
            image = load_rgb(path)
        except ImageFolderError as err:
            if not skip_unreadable:
                raise ImageFolderError(f"{err} Fix or remove it, or set data.skip_unreadable=true.") from err
            log.warning("Skipping %s (data.skip_unreadable=true)", err)
            continue
        if min(image.size) < resolution:
            small.append(f"{path.name} ({image.width}x{image.height})")
        images.append(image)
        names.append(path.name)
    if not images:
        raise ImageFolderError(f"subject.instance_dir={folder!r}: no readable images.")
    if small:  # one line, however many: a folder of 500 thumbnails is one problem, not 500
        log.warning(
            "%d of %d images in %s are smaller than the training resolution %d and will be upscaled: %s%s",
            len(small),
            len(images),
            folder,
            resolution,
            ", ".join(small[:SMALL_NAMES_SHOWN]),
            ", ..." if len(small) > SMALL_NAMES_SHOWN else "",
        )
    if len(images) < 3:
        log.warning("%s has only %d image(s); DreamBooth expects 3-5 photos of the subject.", folder, len(images))
    for problem in photo_problems(images, names):
        log.warning("subject.instance_dir=%s: %s", folder, problem)
    return images


def photo_problems(images: list[Image.Image], names: list[str]) -> list[str]:
    """Photos that look like noise or repeat one another: training on them teaches the model nothing of a
    subject, and the run would only show it at the end."""
    small = [np.asarray(i.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float32) / 255 for i in images]
    noisy = []
    for name, image in zip(names, images):
        pixels = np.asarray(image.convert("L").resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        if np.abs(np.diff(pixels, axis=1)).mean() > NOISE_ROUGHNESS * (pixels.std() + 1e-6):
            noisy.append(name)
    problems = []
    if noisy:
        problems.append(
            f"{len(noisy)} of {len(images)} photos look like random noise, not a photo of a subject: {', '.join(noisy)}"
        )
    duplicates = [
        f"{names[i]} = {names[j]}"
        for i in range(len(small))
        for j in range(i + 1, len(small))
        if np.abs(small[i] - small[j]).mean() < DUPLICATE_DIFFERENCE
    ]
    if duplicates:
        problems.append(
            f"near-duplicate photos ({', '.join(duplicates)}): DreamBooth needs different views of the subject, "
            "or it learns one picture"
        )
    return problems


class ResumableSampler(Sampler):
    """Shuffles per epoch from (seed, epoch) and gives each item its own augmentation seed.

    Order and augmentation depend only on (seed, epoch, position), and `resume_at` = (epoch, positions)
    passes over the items a checkpoint already trained on, so a run resumed mid-epoch sees exactly the
    items that an uninterrupted run would have. Under distributed training rank r of W takes positions
    r, r + W, ... of that one order, in whole rounds so that every rank has as many items (one round,
    wrapping around, when there are fewer items than ranks): W ranks with batch b train on the items one
    process with batch W x b would.
    """

    def __init__(
        self, size: int, seed: int, resume_at: tuple[int, int] | None = None, rank: int = 0, world_size: int = 1
    ):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.resume_at = resume_at
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.size // self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) % 2**63)
        order = torch.randperm(self.size, generator=generator).tolist()
        item_seeds = torch.randint(0, 2**31 - 1, (self.size,), generator=generator).tolist()
        start = self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0
        self.resume_at = None
        remaining = self.size - start
        rounds = max(1, remaining // self.world_size) if remaining > 0 else 0
        for position in range(start + self.rank, start + rounds * self.world_size, self.world_size):
            yield order[position % self.size], item_seeds[position % self.size]


class DreamBoothDataset(Dataset):
    """Item i pairs instance image i mod N with class image i mod M.

    The few instance images are kept decoded in memory; class images are read lazily. With several
    instance prompts (Textual Inversion's templates) each item draws one from its augmentation seed.
    """

    def __init__(
        self,
        instance_images: list[Image.Image],
        instance_prompts: list[str],
        transform: ImageTransform,
        class_paths: list[Path] | None = None,
        class_prompt: str | None = None,
    ):
        self.instance_images = instance_images
        self.instance_prompts = instance_prompts
        self.class_paths = class_paths or []
        self.class_prompt = class_prompt
        self.transform = transform

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_paths))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """`key` is (index, augmentation seed), as `ResumableSampler` yields it."""
        index, seed = key
        rng = random.Random(seed)
        instance = index % len(self.instance_images)
        item = self._view_item("instance", instance, self.instance_images[instance], rng)
        if self.class_paths:
            path = self.class_paths[index % len(self.class_paths)]
            item |= self._view_item("class", path.name, load_rgb(path), rng)
            item["class_prompt"] = self.class_prompt
        prompts = self.instance_prompts
        item["instance_prompt"] = prompts[0] if len(prompts) == 1 else rng.choice(prompts)
        return item

    def _view_item(self, kind: str, name, image: Image.Image, rng: random.Random) -> dict:
        """Pixels, latent-cache key and the image's own size and crop (SDXL's time ids), for any family."""
        view = self.transform.view(image, rng)
        return {
            f"{kind}_pixels": view.pixels,
            f"{kind}_key": self._cache_key(kind, name, view.name),
            f"{kind}_original_size": view.original_size,
            f"{kind}_crop_top_left": view.crop_top_left,
        }

    def _cache_key(self, kind: str, name, view: str) -> str | None:
        """Names one image view for the latent cache; None (never cached) when views are unbounded."""
        return f"{kind}:{name}:{view}" if self.transform.few_views else None


def collate(items: list[dict]) -> dict:
    """Concatenate instance then prior samples; `is_prior` marks the second half."""
    halves = ("instance", "class") if "class_pixels" in items[0] else ("instance",)
    pixels = [item[f"{half}_pixels"] for half in halves for item in items]
    is_prior = torch.zeros(len(pixels), dtype=torch.bool)
    is_prior[len(items) :] = True
    batch = {
        "pixel_values": torch.stack(pixels),
        "prompts": [item[f"{half}_prompt"] for half in halves for item in items],
        "cache_keys": [item.get(f"{half}_key") for half in halves for item in items],
        "is_prior": is_prior,
    }
    if "instance_original_size" in items[0]:  # (batch, 2) each: (height, width) and (top, left)
        for field, name in (("original_size", "original_sizes"), ("crop_top_left", "crops_top_left")):
            batch[name] = torch.tensor([item[f"{half}_{field}"] for half in halves for item in items])
    return batch


class DreamBoothDataModule(L.LightningDataModule):
    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str | list[str],
        resolution: int,
        batch_size: int = 1,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        resize_filter: str = "bicubic",
        class_prompt: str | None = None,
        num_class_images: int = 0,
        class_images: ClassImageCache | None = None,
        class_dir: str | None = None,
        validation_prompts: list[str] | None = None,
        seed: int = 0,
        skip_unreadable: bool = False,
    ):
        super().__init__()
        self.instance_images = load_instance_images(instance_dir, resolution, skip_unreadable)
        self.instance_prompts = [instance_prompt] if isinstance(instance_prompt, str) else list(instance_prompt)
        self.class_prompt = class_prompt
        self.num_class_images = num_class_images
        self.class_images = class_images
        # Your own class images (e.g. real photos) instead of generated ones: no generation at all.
        self.class_dir_paths = (
            list_images(class_dir, option="prior.class_dir")[:num_class_images] if class_dir else None
        )
        self.validation_prompts = list(validation_prompts or [])
        self.transform = ImageTransform(resolution, center_crop, random_flip, resize_filter)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.dataset: DreamBoothDataset | None = None
        self.items_trained = 0  # in the current epoch; saved in checkpoints to resume mid-epoch
        self._epoch_counted = 0
        self._resume: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        """Runs on every rank (unlike `prepare_data`, which Lightning runs on one rank per node), so that
        under distributed training all ranks share the class-image generation."""
        class_paths = self.class_dir_paths
        if class_paths is None and self.class_images is not None:
            class_paths = self._generate_class_images()
        self.dataset = DreamBoothDataset(
            self.instance_images, self.instance_prompts, self.transform, class_paths, self.class_prompt
        )

    def fixed_prompts(self) -> list[str]:
        """Every prompt a training batch can carry (the text-embedding cache can hold them all up front)."""
        return [*self.instance_prompts, *([self.class_prompt] if self.class_prompt else [])]

    def _generate_class_images(self) -> list[Path]:
        """Each rank makes its share of the missing class images, then all wait and read the same files."""
        cache, prompt, count = self.class_images, self.class_prompt, self.num_class_images
        rank, world_size = self._rank_and_world_size()
        cache.ensure(prompt, count, rank, world_size)
        if world_size > 1:
            self.trainer.strategy.barrier("class_images")
            if rank == 0:
                cache.write_manifest(prompt, count)
            missing = cache.missing(prompt, count)
            if missing:
                raise FileNotFoundError(
                    f"Rank {rank} cannot see {len(missing)} class image(s) the other ranks made in "
                    f"{cache.folder(prompt)}: under multi-node training paths.cache_dir must be a folder "
                    "that every node shares."
                )
        return cache.paths(prompt, count)

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count positions of the sampler's order as they reach training (not when prefetched), per epoch:
        the ranks advance in step, each taking one position in every round of world_size."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch != self._epoch_counted:
            self._epoch_counted, self.items_trained = epoch, 0
        self.items_trained += int((~batch["is_prior"]).sum()) * self._rank_and_world_size()[1]
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch_counted, "items_trained": self.items_trained}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def train_dataloader(self) -> DataLoader:
        resume_at = None
        if self._resume is not None:
            resume_at = (self._resume["epoch"], self._resume["items_trained"])
            self._epoch_counted, self.items_trained = resume_at
            self._resume = None
        # Sharded here, not by Lightning (trainer.use_distributed_sampler=false), which would shuffle again.
        sampler = ResumableSampler(len(self.dataset), self.seed, resume_at, *self._rank_and_world_size())
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=len(sampler) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
        )
