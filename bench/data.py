"""Image reading, preprocessing and the torch datasets/samplers the trainer and evaluators share."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from bench.errors import UserError
from bench.method import Batch
from bench.towers import Tokenizer


def read_grayscale(path: str | Path) -> np.ndarray:
    """Any JPG/PNG (8 or 16 bit, RGB/RGBA) as a 2-D uint8 array."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                return ((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
            return np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be decoded as an image ({exc})") from None


def resize_and_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Longer side to `size` keeping the aspect ratio, then zero-pad to a centred square."""
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


class ImagePreprocessor:
    """uint8 square -> normalised float tensor with the model's 3 channels; optional seeded augmentation
    (a mild random resized crop; no flips, since left and right carry meaning in radiographs)."""

    def __init__(self, size: int, mean: float, std: float, augment: bool):
        self.size, self.mean, self.std, self.augment = size, mean, std, augment

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
        return x.expand(3, -1, -1).contiguous()


class ImageTextDataset(Dataset):
    """Rows of a manifest as (image tensor, text, sample id). Decoded squares are kept in memory, and the
    augmentation of item i in epoch e depends only on (seed, e, i): resumed runs see the same pixels."""

    def __init__(self, paths: Sequence[str], texts: Sequence[str] | None, ids: Sequence[str],
                 preprocess: ImagePreprocessor, seed: int = 0):
        self.paths, self.texts, self.ids = list(paths), None if texts is None else list(texts), list(ids)
        self.preprocess, self.seed, self.epoch = preprocess, seed, 0
        self._cache: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def square(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = resize_and_pad(read_grayscale(self.paths[i]), self.preprocess.size)
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str | None, str]:
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.preprocess.augment else None
        return self.preprocess(self.square(i), rng), None if self.texts is None else self.texts[i], self.ids[i]


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
