"""Preprocessing of cached image squares, and the torch datasets and samplers the trainer and evaluators share."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.images import ImageCache
from bench.method import Batch


class ImagePreprocessor:
    """uint8 square -> float tensor normalised with the model preset's mean/std and repeated to its input
    channels; optional seeded augmentation (a mild random resized crop; no flips, since left and right
    carry meaning in radiographs)."""

    def __init__(self, size: int, mean: float, std: float, augment: bool, channels: int = 3):
        self.size, self.mean, self.std, self.augment, self.channels = size, mean, std, augment, channels

    def __call__(self, square: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        x = torch.from_numpy(square).float().div_(255.0)
        if self.augment and rng is not None:
            scale = rng.uniform(0.8, 1.0)
            side = int(round(self.size * np.sqrt(scale)))
            top, left = rng.integers(0, self.size - side + 1, 2)
            crop = x[top:top + side, left:left + side][None, None]
            x = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0, 0]
        x = (x - self.mean) / self.std
        return x.expand(self.channels, -1, -1).contiguous()


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
