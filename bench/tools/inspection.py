"""`bench data inspect` and `bench data throughput`: what a dataset root holds, and how fast its images load."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.core.registry import DATASETS
from bench.data.adapter import Adapter
from bench.data.images import ImageCache, usable


def summarise(adapter: Adapter, strict: bool = False, workers: int = 0) -> dict:
    """Counts from the metadata files alone (images are only checked for existence, or decoded with
    `strict`, which turns a missing or corrupt image into an error)."""
    manifest = adapter.read(with_reports=False)
    exists = np.fromiter((os.path.exists(p) for p in manifest["image_path"]), bool, len(manifest))
    if strict and not exists.all():
        first = manifest["image_path"][~exists].iloc[0]
        raise UserError(f"{adapter.name}: {int((~exists).sum())} image file(s) named in the metadata are missing "
                        f"under {adapter.root}; first: {first}")
    if strict:
        usable(ImageCache(None, 32), manifest["image_path"], "error", f"{adapter.name} ({adapter.root})", workers)
    uncertain = manifest.attrs.get("uncertain", {})
    task = adapter.task
    return {
        "dataset": adapter.name,
        "n_samples": int(len(manifest)),
        "n_patients": int(manifest["patient_id"].nunique()),
        "n_missing_images": int((~exists).sum()),
        "splits": {str(s): {"n": int(len(g)), "n_patients": int(g["patient_id"].nunique())}
                   for s, g in manifest.groupby("split", sort=True)},
        "labels": {c: {"positive": int((manifest[c] == 1).sum()), "negative": int((manifest[c] == 0).sum()),
                       "uncertain": int(uncertain.get(c, 0))} for c in task.labels},
    }


def render(summary: dict, task_kind: str, metric: str) -> str:
    lines = [f"{summary['dataset']}: {summary['n_samples']} images of {summary['n_patients']} patients "
             f"({summary['n_missing_images']} image files missing); {task_kind} task, metric {metric}", "splits:"]
    lines += [f"  {s:<10} {v['n']:>8} images {v['n_patients']:>8} patients" for s, v in summary["splits"].items()]
    table = pd.DataFrame(summary["labels"]).T
    lines += ["labels (positive/negative after the uncertain-label policy; uncertain = raw -1 values):",
              *("  " + line for line in table.to_string().splitlines())]
    return "\n".join(lines)


def throughput(paths: list[str], size: int, mean: float, std: float, cache_dir: str | None) -> dict[str, float]:
    """Images/s of what an epoch does per image (decode, resize-and-pad, normalise) without the cache, on
    the pass that fills the cache, and on a pass that reads it."""
    from bench.data.image_datasets import ImagePreprocessor, ImageTextDataset

    pre = ImagePreprocessor(size, mean, std, augment=False)

    def rate(cache: ImageCache) -> float:
        dataset = ImageTextDataset(paths, None, paths, pre, cache)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        return len(dataset) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(cache_dir or tmp) / f"throughput-{os.getpid()}"
        out = {"decode_every_time": rate(ImageCache(None, size)), "cache_fill": rate(ImageCache(directory, size)),
               "cache_read": rate(ImageCache(directory, size))}
    out["speedup"] = out["cache_read"] / out["decode_every_time"]
    return out


def default_settings(name: str, overrides: list[str]) -> dict:
    """The dataset's settings as its adapter declares them (`data.<name>`), with `key=value` overrides applied."""
    from omegaconf import OmegaConf

    owner = DATASETS.get(name).settings_owner()
    settings = OmegaConf.create({"root": None, **owner.defaults})
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"malformed setting {bad[0]!r}: expected key=value (e.g. uncertain_policy=ones)")
    unknown = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].split(".")[0] not in settings]
    if unknown:
        raise UserError(f"{name} has no setting {unknown[0]!r}; its settings: {', '.join(settings)}")
    try:
        return OmegaConf.to_container(OmegaConf.merge(settings, OmegaConf.from_dotlist(overrides)))
    except Exception as exc:  # OmegaConf's grammar and type errors: report them as the bad setting they are
        raise UserError(f"bad dataset setting in {', '.join(overrides)}: {str(exc).splitlines()[0]}") from None
