"""Loading a dataset: the one way every part of the harness gets one (evaluation, the pretraining corpus,
sweeps, `bench mask`). A dataset is its adapter's manifest read from its root (or from its copy in the
synthetic benchmark, generated on first use), checked (or, by `data.<name>.patient_overlap`, repaired) to keep
every patient in one split, with its frozen split files, the image cache and the model preset's preprocessing."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.registry import DATASETS
from bench.data.adapter import Task
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache, usable
from bench.data.splits import SplitFiles, fraction_file, materialise


def dataset_settings(cfg: DictConfig, name: str) -> DictConfig:
    """`data.<name>`, or the entry a dataset variant shares (chexpert-5x200 reads `data.chexpert`)."""
    key = DATASETS.get(name).settings_key()
    if key not in cfg.data:
        raise UserError(f"dataset {name!r} has no settings: data.{key} is missing from the config")
    return cfg.data[key]


def dataset_identity(cfg: DictConfig, name: str) -> dict:
    """What decides a dataset's samples: its settings, the corrupt-image policy, and, when it reads the
    synthetic copy (root null), the generator's parameters. Cache and split folders are left out."""
    from bench.data.synth import GENERATOR_VERSION, generated_with

    settings = to_plain(dataset_settings(cfg, name))
    out = {"dataset": name, "settings": settings, "corrupt_images": cfg.data.corrupt_images}
    if settings.get("root") is None:
        syn = cfg.data.synthetic
        owner = DATASETS.get(name).settings_owner()
        counts = owner.synthetic.counts if owner.synthetic is not None else {}
        # what made the folder, when it exists: an older generator's folder is read as it is, and keeps the
        # identity it had (generators before version 6 had no difficulty)
        found = generated_with(Path(os.path.expanduser(syn.root))) or {}
        version = found.get("generator_version", GENERATOR_VERSION)
        out["synthetic"] = {"size": syn.size, "seed": syn.seed, "generator_version": version,
                            "count": found.get("counts", {}).get(owner.name, counts.get(syn.size))}
        if version >= 6:
            out["synthetic"]["difficulty"] = found.get("difficulty", syn.difficulty)
    return out


def dataset_root(cfg: DictConfig, name: str) -> Path:
    """The dataset's configured root, or its copy in the synthetic benchmark (generated on first use)."""
    settings = dataset_settings(cfg, name)
    if settings.root is not None:
        return Path(os.path.expanduser(str(settings.root)))
    from bench.data.synth import dataset_dir, ensure_synthetic

    syn = cfg.data.synthetic
    root = ensure_synthetic(Path(os.path.expanduser(syn.root)), syn.size, int(syn.seed), difficulty=syn.difficulty,
                            datasets=[name])
    return root / dataset_dir(name)


@dataclass
class LoadedDataset:
    """A dataset ready to evaluate or train on: its manifest, task and frozen split files, and the image
    cache and preprocessing of the model preset."""

    name: str
    manifest: pd.DataFrame
    task: Task
    splits: SplitFiles
    cache: ImageCache
    image_cfg: DictConfig
    corrupt_images: str = "skip"
    decode_workers: int = 1
    # label values as written (uncertain -1, blank NaN) by sample id, where the adapter has an uncertainty policy
    # and they were asked for; the manifest's labels are the policy's
    written_labels: pd.DataFrame | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # split file -> unreadable images left out
    _usable: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def rows(self, split: str, fraction: float = 1.0, subset_seed: int | None = None) -> pd.DataFrame:
        """The split's rows (a label fraction's, for train) whose images can be read: each is decoded into
        the cache now if it is not there yet, so no epoch meets an unreadable file."""
        rows = self.splits.rows(split, fraction, subset_seed)
        name = fraction_file(fraction, subset_seed) if split == "train" else f"{split}.txt"
        if name not in self._usable:  # checked once per split file: every fraction x seed asks again
            self._usable[name] = usable(self.cache, rows["image_path"], self.corrupt_images, f"{self.name} {split}",
                                        self.decode_workers)
        ok = self._usable[name]
        self.skipped[name] = int((~ok).sum())
        return rows[ok].reset_index(drop=True)

    def labels_as_written(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The task's label columns of `rows` as the files write them (the policy's where there is none)."""
        if self.written_labels is None:
            return rows[self.task.labels].reset_index(drop=True)
        return self.written_labels.loc[rows["sample_id"]].reset_index(drop=True)

    def preprocessor(self, augment: bool) -> ImagePreprocessor:
        image = self.image_cfg
        return ImagePreprocessor(image.image_size, image.mean, image.std, augment, image.get("channels", 3))


def load_dataset(cfg: DictConfig, name: str, with_reports: bool = False, labels_as_written: bool = False,
                 cache_size: int | None = None) -> LoadedDataset:
    """Dataset `name` as `cfg` sets it up. With `labels_as_written`, it also keeps the label values as the
    files write them (uncertain -1 and blank) where the adapter has an uncertainty policy: the pretraining
    corpus writes prompts from them. Splits and everything else follow the policy's labels. `cache_size`: the
    side of the cached squares `rows` decodes into (default the image tower's; the pretraining corpus's own
    where a method reads larger images, so each image is decoded once)."""
    settings, root = dataset_settings(cfg, name), dataset_root(cfg, name)
    adapter = DATASETS.get(name)(root, settings)
    manifest = adapter.read(with_reports=with_reports)
    if manifest.empty:
        raise UserError(f"{name}: no usable samples under {adapter.root}")
    manifest = adapter.patient_disjoint(manifest)
    written = adapter.labels_as_written(manifest) if labels_as_written else None
    splits = materialise(manifest, adapter.task, name, cfg.data.splits_dir)
    workers = cfg.runtime.get("decode_workers") or os.cpu_count() or 1
    size = int(cfg.model.image.image_size) if cache_size is None else cache_size
    return LoadedDataset(name, manifest, adapter.task, splits, ImageCache(cfg.data.cache_dir, size), cfg.model.image,
                         cfg.data.corrupt_images, int(workers), written_labels=written)
