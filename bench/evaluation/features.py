"""Frozen image features, computed once per (model, dataset, split) and shared by every frozen protocol.

Zero-shot and the linear probe both start from `method.encode_image` over a whole split (zero-shot then
applies `method.project_image`), every label fraction is a subset of the train split's features, and every
seed reuses them. So a split's images pass through the encoder at most once per model: features are kept in
memory for the run and, when the cache has a folder, on disk as `<folder>/<dataset>/<split>.npz` with what
the numbers depend on, so a later run reuses them: the folder is the weights' hash, and the file keeps the
sample ids, the preprocessing, and the identity of the image files read (each one's absolute path, size and
modification time: `bench.data.images.files_sha256`). A changed image, or the same dataset read from another
root, is encoded again.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from bench.core.io import UnwritableDestination, atomic_write, remove_stale_temporaries
from bench.data.adapter import Task
from bench.data.image_datasets import ImagePreprocessor, ImageTextDataset, collate_images
from bench.data.images import ImageCache, files_sha256
from bench.train import distributed


@torch.no_grad()
def image_outputs(method: torch.nn.Module, rows: pd.DataFrame, fn: Callable[[torch.Tensor], torch.Tensor],
                  preprocess: ImagePreprocessor, cache: ImageCache, batch_size: int, device: torch.device,
                  num_workers: int = 0) -> np.ndarray:
    """`fn(images)` for every row, as a float32 array in row order (no shuffling, no dropped batch)."""
    method.eval()
    dataset = ImageTextDataset(rows["image_path"], None, rows["sample_id"], preprocess, cache)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                        collate_fn=collate_images, num_workers=num_workers)
    chunks = [fn(batch.images.to(device)).float().cpu().numpy() for batch in loader]
    out = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    if len(out) != len(rows):
        raise RuntimeError(f"evaluated {len(out)} of {len(rows)} samples; every sample must be evaluated once")
    return out


@dataclass
class FeatureCache:
    """Features of one model. `folder` None keeps them in memory only; `encoded` counts encoder passes per
    (dataset, split) and `seconds` the time spent encoding, for the timing report."""

    folder: Path | None
    batch_size: int
    device: torch.device
    num_workers: int = 0
    memory: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # (dataset, split, ids hash) -> files_sha256 of its images
    encoded: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def get(self, method: torch.nn.Module, data, split: str) -> tuple[pd.DataFrame, np.ndarray]:
        """(the split's readable rows, their `encode_image` features), computing them only when neither memory
        nor disk has them for exactly these rows and this preprocessing."""
        rows = data.rows(split)
        preprocess = data.preprocessor(augment=False)
        ids = ids_sha256(rows["sample_id"])
        if (data.name, split, ids) not in self.files:  # one stat per image per run, not per protocol and fraction
            self.files[data.name, split, ids] = files_sha256(rows["image_path"])
        meta = {"ids_sha256": ids, "files_sha256": self.files[data.name, split, ids],
                "image": {"size": preprocess.size, "mean": preprocess.mean, "std": preprocess.std,
                          "channels": preprocess.channels}}
        key = (data.name, split, json.dumps(meta, sort_keys=True, default=str))
        if key not in self.memory:
            self.memory[key] = self._load(data.name, split, meta)
            if self.memory[key] is None:
                started = time.perf_counter()
                self.memory[key] = image_outputs(method, rows, method.encode_image, preprocess, data.cache,
                                                 self.batch_size, self.device, self.num_workers)
                self.seconds += time.perf_counter() - started
                self.encoded[(data.name, split)] += 1
                self._save(data.name, split, meta, self.memory[key])
        return rows, self.memory[key]

    def _path(self, dataset: str, split: str) -> Path | None:
        return None if self.folder is None else self.folder / dataset / f"{split}.npz"

    def _load(self, dataset: str, split: str, meta: dict) -> np.ndarray | None:
        path = self._path(dataset, split)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if json.loads(str(stored["meta"])) != json.loads(json.dumps(meta, default=str)):
                    return None
                return stored["features"]
        except (OSError, ValueError, KeyError):  # a torn or foreign file is recomputed, never trusted
            return None

    def _save(self, dataset: str, split: str, meta: dict, features: np.ndarray) -> None:
        path = self._path(dataset, split)
        if path is None or not distributed.is_main():  # under torchrun every rank computes them; one writes
            return
        remove_stale_temporaries(path.parent)
        try:
            atomic_write(path, lambda fh: np.savez(fh, features=features,
                                                   meta=np.array(json.dumps(meta, sort_keys=True, default=str))))
        except UnwritableDestination as exc:  # a cache that cannot be written slows later runs; it stops none
            print(f"bench: feature cache not saved: {exc}", file=sys.stderr)
            self.folder = None


def ids_sha256(ids) -> str:
    """Identifies a list of samples in its order (a test set: paired comparisons need the same one)."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def predictions_frame(rows: pd.DataFrame, task: Task, y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Per-sample truth and scores, enough to recompute every metric later."""
    return pd.DataFrame({"sample_id": rows["sample_id"].values,
                         **{f"true/{c}": y[:, j] for j, c in enumerate(task.labels)},
                         **{f"score/{c}": scores[:, j] for j, c in enumerate(task.labels)}})
