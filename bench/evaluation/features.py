"""Frozen forward passes over manifest rows, in order, covering every sample exactly once."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from bench.data import ImagePreprocessor, ImageTextDataset, collate_images
from bench.datasets.base import Task
from bench.images import ImageCache
from bench.method import Method


@torch.no_grad()
def image_outputs(method: Method, rows: pd.DataFrame, fn: Callable[[torch.Tensor], torch.Tensor],
                  preprocess: ImagePreprocessor, cache: ImageCache, batch_size: int, device: torch.device,
                  num_workers: int = 0) -> np.ndarray:
    """`fn(images)` for every row, as a float32 array in row order (no shuffling, no dropped batch)."""
    method.eval()
    dataset = ImageTextDataset(rows["image_path"], None, rows["sample_id"], preprocess, cache)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                        collate_fn=collate_images, num_workers=num_workers)
    chunks = [fn(batch.images.to(device)).float().cpu().numpy() for batch in loader]
    out = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    assert len(out) == len(rows), "every sample must be evaluated exactly once"
    return out


def predictions_frame(rows: pd.DataFrame, task: Task, y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Per-sample truth and scores, enough to recompute every metric later."""
    return pd.DataFrame({"sample_id": rows["sample_id"].values,
                         **{f"true/{c}": y[:, j] for j, c in enumerate(task.labels)},
                         **{f"score/{c}": scores[:, j] for j, c in enumerate(task.labels)}})
