"""Preprocessing of cached image squares, and the torch datasets and samplers the trainer and evaluators share."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.data.batch import Batch
from bench.data.images import ImageCache


class ImagePreprocessor:
    """uint8 square -> float tensor normalised with the model preset's mean/std and repeated to its input
    channels; optional seeded augmentation (a mild random resized crop; no flips, since left and right
    carry meaning in radiographs)."""

    def __init__(self, size: int, mean: float | Sequence[float], std: float | Sequence[float], augment: bool,
                 channels: int = 3):
        self.size, self.augment, self.channels = size, augment, channels
        # one value for every channel (the harness's grey presets) or one per channel (an RGB CLIP's)
        self.mean, self.std = (float(v) if isinstance(v, (int, float)) else [float(x) for x in v] for v in (mean, std))
        self._mean, self._std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (self.mean, self.std))

    def __call__(self, square: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        x = torch.from_numpy(square).float().div_(255.0)
        if self.augment and rng is not None:
            scale = rng.uniform(0.8, 1.0)
            side = int(round(self.size * np.sqrt(scale)))
            top, left = rng.integers(0, self.size - side + 1, 2)
            crop = x[top:top + side, left:left + side][None, None]
            x = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0, 0]
        return ((x.expand(self.channels, -1, -1) - self._mean) / self._std).contiguous()


class ImageTextDataset(Dataset):
    """Rows of a manifest as (image tensor, text, sample id). Resized squares come from the on-disk image
    cache, and the augmentation of item i in epoch e depends only on (seed, e, i): resumed runs see the
    same pixels."""

    def __init__(self, paths: Sequence[str], texts: Sequence[str] | None, ids: Sequence[str],
                 preprocess: ImagePreprocessor, cache: ImageCache, seed: int = 0):
        if cache.size != preprocess.size:
            raise ValueError(f"image cache holds {cache.size}px squares, the model wants {preprocess.size}px")
        self.paths, self.texts, self.ids = list(paths), None if texts is None else list(texts), list(ids)
        self.preprocess, self.cache, self.seed, self.epoch = preprocess, cache, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | None, str]:
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.preprocess.augment else None
        text = None if self.texts is None else self.texts[i]
        return self.preprocess(self.cache.get(self.paths[i]), rng), text, self.ids[i]


def collate_images(items: list) -> Batch:
    """(image, text, id) items -> a Batch of images only (what evaluators feed the image encoder)."""
    return Batch(torch.stack([it[0] for it in items]), None, [it[2] for it in items])


class LabelledImageDataset(ImageTextDataset):
    """Rows of a manifest as (image tensor, label vector, sample id), for fine-tuning."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, ids: Sequence[str], preprocess: ImagePreprocessor,
                 cache: ImageCache, seed: int = 0):
        super().__init__(paths, None, ids, preprocess, cache, seed)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, _, sample_id = super().__getitem__(i)
        return image, self.labels[i], sample_id


def collate_labelled(items: list) -> Batch:
    """(image, labels, id) items -> a Batch of images with their label vectors."""
    return Batch(torch.stack([it[0] for it in items]), None, [it[2] for it in items],
                 labels=torch.stack([it[1] for it in items]))


class MaskedImageDataset(ImageTextDataset):
    """Rows of a manifest as (image tensor, [size, size] float mask at the model's input geometry, sample id),
    for segmentation; no augmentation (a crop would have to move the mask with the image)."""

    def __init__(self, paths: Sequence[str], masks: np.ndarray, ids: Sequence[str], preprocess: ImagePreprocessor,
                 cache: ImageCache, seed: int = 0):
        super().__init__(paths, None, ids, preprocess, cache, seed)
        self.masks = np.asarray(masks, dtype=bool)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, _, sample_id = super().__getitem__(i)
        return image, torch.from_numpy(self.masks[i].astype(np.float32)), sample_id
