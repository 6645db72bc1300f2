"""Instance and prior images, interleaved so that every batch holds both halves."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dreambooth_pl.class_images import ClassImageCache
from dreambooth_pl.images import ImageTransform, list_images, load_rgb

log = logging.getLogger(__name__)


class DreamBoothDataset(Dataset):
    """Item i pairs instance image i mod N with class image i mod M.

    The few instance images are kept decoded in memory; class images are read lazily.
    """

    def __init__(
        self,
        instance_images: list[Image.Image],
        instance_prompt: str,
        transform: ImageTransform,
        class_paths: list[Path] | None = None,
        class_prompt: str | None = None,
    ):
        self.instance_images = instance_images
        self.instance_prompt = instance_prompt
        self.class_paths = class_paths or []
        self.class_prompt = class_prompt
        self.transform = transform

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_paths))

    def __getitem__(self, index: int) -> dict:
        # Augmentation draws from torch's RNG, which Lightning seeds in the main process and workers.
        rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
        item = {
            "instance_pixels": self.transform(self.instance_images[index % len(self.instance_images)], rng),
            "instance_prompt": self.instance_prompt,
        }
        if self.class_paths:
            item["class_pixels"] = self.transform(load_rgb(self.class_paths[index % len(self.class_paths)]), rng)
            item["class_prompt"] = self.class_prompt
        return item


def collate(items: list[dict]) -> dict:
    """Concatenate instance then prior samples; `is_prior` marks the second half."""
    pixels = [item["instance_pixels"] for item in items]
    prompts = [item["instance_prompt"] for item in items]
    if "class_pixels" in items[0]:
        pixels += [item["class_pixels"] for item in items]
        prompts += [item["class_prompt"] for item in items]
    is_prior = torch.zeros(len(pixels), dtype=torch.bool)
    is_prior[len(items) :] = True
    return {"pixel_values": torch.stack(pixels), "prompts": prompts, "is_prior": is_prior}


class DreamBoothDataModule(L.LightningDataModule):
    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str,
        resolution: int,
        batch_size: int = 1,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        class_prompt: str | None = None,
        num_class_images: int = 0,
        class_images: ClassImageCache | None = None,
        class_dir: str | None = None,
        validation_prompts: list[str] | None = None,
    ):
        super().__init__()
        # Decoded now, so an unreadable photo is reported before any model is loaded.
        self.instance_images = [load_rgb(p) for p in list_images(instance_dir)]
        if len(self.instance_images) < 3:
            log.warning(
                "%s has only %d image(s); DreamBooth expects 3-5 photos of the subject.",
                instance_dir,
                len(self.instance_images),
            )
        self.instance_prompt = instance_prompt
        self.class_prompt = class_prompt
        self.num_class_images = num_class_images
        self.class_images = class_images
        # Your own class images (e.g. real photos) instead of generated ones: no generation at all.
        self.class_dir_paths = (
            list_images(class_dir, option="prior.class_dir")[:num_class_images] if class_dir else None
        )
        self.validation_prompts = list(validation_prompts or [])
        self.transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset: DreamBoothDataset | None = None

    def prepare_data(self) -> None:
        if self.class_dir_paths is None and self.class_images is not None:
            self.class_images.ensure(self.class_prompt, self.num_class_images)

    def setup(self, stage: str | None = None) -> None:
        class_paths = self.class_dir_paths
        if class_paths is None and self.class_images is not None:
            class_paths = self.class_images.paths(self.class_prompt, self.num_class_images)
        self.dataset = DreamBoothDataset(
            self.instance_images, self.instance_prompt, self.transform, class_paths, self.class_prompt
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=len(self.dataset) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
        )
