"""The built-in synthetic benchmark: procedural chest radiographs with matching reports, written in the
real on-disk formats so the real dataset adapters read them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bench.core.errors import UserError

GENERATOR_VERSION = 5
# dataset -> (folder named as the real download names it, size -> item count)
DATASETS = {
    "mimic-cxr": ("mimic-cxr-jpg", {"tiny": 96, "small": 2000, "medium": 12000}),  # studies
    "chexpert": ("CheXpert-v1.0-small", {"tiny": 48, "small": 2000, "medium": 10000}),  # training patients
    "rsna": ("rsna-pneumonia-detection-challenge", {"tiny": 80, "small": 1500, "medium": 6000}),  # patients
    "siim": ("siim-acr-pneumothorax", {"tiny": 80, "small": 1500, "medium": 6000}),  # images
    "covidx": ("COVIDx", {"tiny": 90, "small": 900, "medium": 4000}),  # patients, a quarter with two images
    "nih": ("ChestX-ray14", {"tiny": 100, "small": 1000, "medium": 5000}),  # patients, one to three images each
}
SIZES = ("tiny", "small", "medium")
MARKER = "synthetic.json"


def dataset_dir(name: str) -> str:
    return DATASETS[name][0]


def ensure_synthetic(root: Path, size: str, seed: int, workers: int | None = None) -> Path:
    """Generate the benchmark under `root` unless a complete one with the same parameters is there.

    Generation happens in a temporary sibling folder that is renamed into place at the end, so a killed
    generation leaves nothing half-written behind and two processes never see a partial tree.
    """
    if size not in SIZES:
        raise UserError(f"unknown synthetic size {size!r}; valid sizes: {', '.join(SIZES)}")
    params = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed,
              "counts": {name: counts[size] for name, (_, counts) in DATASETS.items()}}
    marker = root / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != params:
            raise UserError(f"{root} holds a synthetic benchmark made with {found}, not {params}; "
                            f"choose another data.synthetic.root or delete it")
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists, is not empty and is not a synthetic benchmark; choose another data.synthetic.root")
    writers = _writers()
    workers = workers or min(4, os.cpu_count() or 1)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for name, (folder, counts) in DATASETS.items():
            writers[name](staging / folder, counts[size], seed, workers)
        (staging / MARKER).write_text(json.dumps(params))
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (root / MARKER).exists():  # another process finished first
            return root
        raise
    return root


def _writers() -> dict:
    from bench.data.synth.dicom_writers import write_rsna, write_siim
    from bench.data.synth.png_writers import write_covidx, write_nih
    from bench.data.synth.writers import write_chexpert, write_mimic_cxr_jpg

    return {"mimic-cxr": write_mimic_cxr_jpg, "chexpert": write_chexpert, "rsna": write_rsna, "siim": write_siim,
            "covidx": write_covidx, "nih": write_nih}
