"""The built-in synthetic benchmark: procedural chest radiographs with matching reports, written in the
real on-disk formats so the real dataset adapters read them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bench.errors import UserError

GENERATOR_VERSION = 3
# size -> (MIMIC studies, CheXpert train patients, CheXpert valid patients)
SIZES = {"tiny": (96, 48, 40), "small": (2000, 600, 400), "medium": (12000, 4000, 1000)}
MIMIC_DIR, CHEXPERT_DIR = "mimic-cxr-jpg", "CheXpert-v1.0-small"
MARKER = "synthetic.json"


def ensure_synthetic(root: Path, size: str, seed: int, workers: int | None = None) -> Path:
    """Generate the benchmark under `root` unless a complete one with the same parameters is there.

    Generation happens in a temporary sibling folder that is renamed into place at the end, so a killed
    generation leaves nothing half-written behind and two processes never see a partial tree.
    """
    if size not in SIZES:
        raise UserError(f"unknown synthetic size {size!r}; valid sizes: {', '.join(SIZES)}")
    params = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed}
    marker = root / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != params:
            raise UserError(f"{root} holds a synthetic benchmark made with {found}, not {params}; "
                            f"choose another data.root or delete it")
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists, is not empty and is not a synthetic benchmark; choose another data.root")
    from bench.synth.writers import write_chexpert, write_mimic_cxr_jpg

    n_mimic, n_train, n_valid = SIZES[size]
    workers = workers or min(4, os.cpu_count() or 1)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write_mimic_cxr_jpg(staging / MIMIC_DIR, n_mimic, seed, workers)
        write_chexpert(staging / CHEXPERT_DIR, n_train, n_valid, seed, workers)
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
