"""Preprocessing of cached image squares, and the torch datasets and samplers the trainer and evaluators share."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bench.errors import UserError
from bench.images import ImageCache
from bench.method import Batch
from bench.towers import Tokenizer


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


def collate_fn(tokenizer: Tokenizer | None) -> Callable[[list], Batch]:
    def collate(items: list) -> Batch:
        images = torch.stack([it[0] for it in items])
        texts = [it[1] for it in items]
        text = tokenizer(texts) if tokenizer is not None and texts[0] is not None else None
        return Batch(images, text, [it[2] for it in items])

    return collate


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose order depends only on (seed, epoch); `skip` resumes mid-epoch exactly."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True):
        if n < batch_size and drop_last:
            raise UserError(f"the training set has {n} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        full = self.n // self.batch_size * self.batch_size if self.drop_last else self.n
        return [order[i:i + self.batch_size].tolist() for i in range(0, full, self.batch_size)]

    def __iter__(self):
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        return (self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)) - self.skip
