"""The built-in synthetic benchmark: procedural chest radiographs with matching reports, written in the
real on-disk formats so the real dataset adapters read them. Which datasets it holds, in which folders, how
many items and by which writer, each adapter declares (`Adapter.synthetic`); a dataset registered after a
benchmark was generated is added to it on first use (a benchmark an older generator version made is read as
it is and never added to)."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from bench.core.errors import UserError
from bench.core.io import atomic_write_text
from bench.core.progress import note

GENERATOR_VERSION = 7  # 6: findings told by shape and texture under nuisance, difficulty levels, ground-truth sidecars;
# 7: standard difficulty at (1.25, 0.75), a pleural line the models can see
SIZES = ("tiny", "small", "medium")
DIFFICULTIES = ("easy", "standard", "hard")  # what each scales: drawing.DIFFICULTIES
MARKER = "synthetic.json"


def folder_name(size: str, seed: int, difficulty: str) -> str:
    """The default folder of a benchmark (configs/data/default.yaml writes the same): a new generator version
    writes under a new name, so the folders older versions made are never overwritten."""
    return f"synthetic-v{GENERATOR_VERSION}-{difficulty}-{size}-{seed}"


def synthetic_adapters() -> list:
    """The adapters with a synthetic copy (their `synthetic` declaration), by name; a variant that reads
    another adapter's files has that adapter's copy."""
    from bench.core.registry import DATASETS

    return [cls for cls in DATASETS.classes() if cls.synthetic is not None and not cls.is_variant()]


def dataset_dir(name: str) -> str:
    """The folder of dataset `name`'s synthetic copy (a variant's: the dataset whose files it reads)."""
    from bench.core.registry import DATASETS

    owner = DATASETS.get(name).settings_owner()
    if owner.synthetic is None:
        raise UserError(f"dataset {name!r} has no synthetic copy: set data.{owner.name}.root to its files")
    return owner.synthetic.folder


def ensure_synthetic(root: Path, size: str, seed: int, workers: int | None = None, difficulty: str = "standard",
                     datasets: Sequence[str] | None = None) -> Path:
    """Generate the benchmark under `root` unless one with the same parameters is there; with `datasets`, only
    their copies (each dataset's copy depends on (size, seed, difficulty) alone, so one generated later is the
    same as one generated with the rest: a run generates what it reads, and the others join on first use). A
    folder an older generator made with the same size and seed is read as it is (its marker says which version
    made it); a new version writes only under a new name (the default root names the version).

    Generation happens in a temporary sibling folder that is renamed into place at the end, so a killed
    generation leaves nothing half-written behind and two processes never see a partial tree.
    """
    if size not in SIZES:
        raise UserError(f"unknown synthetic size {size!r}; valid sizes: {', '.join(SIZES)}")
    if difficulty not in DIFFICULTIES:
        raise UserError(f"unknown synthetic difficulty {difficulty!r}; valid: {', '.join(DIFFICULTIES)}")
    adapters = synthetic_adapters()
    if datasets is not None:
        from bench.core.registry import DATASETS

        wanted = {DATASETS.get(name).settings_owner().name for name in datasets}
        adapters = [cls for cls in adapters if cls.name in wanted]
    params = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed, "difficulty": difficulty,
              "counts": {cls.name: cls.synthetic.counts[size] for cls in adapters}}
    workers = workers or min(4, os.cpu_count() or 1)
    found = generated_with(root)
    if found is not None:
        counts = found.get("counts", {})
        if found.get("generator_version", 0) < GENERATOR_VERSION:  # an older benchmark: readable, never rewritten
            if (found.get("size"), found.get("seed"), found.get("difficulty", "standard")) != (size, seed, difficulty):
                _refuse(root, found, params)
            missing = sorted(set(params["counts"]) - set(counts))
            if missing:
                raise UserError(f"{root} was made by generator version {found.get('generator_version')}, before "
                                f"{', '.join(missing)} joined the benchmark; an older benchmark is never added to: "
                                f"choose another data.synthetic.root")
            return root
        same = {k: v for k, v in found.items() if k != "counts"} == {k: v for k, v in params.items() if k != "counts"}
        if not same or any(counts.get(name, n) != n for name, n in params["counts"].items()):
            _refuse(root, found, params)
        for cls in adapters:  # a dataset registered since: its copy joins the benchmark, the others stay as they are
            if cls.name not in counts:
                _add_dataset(root, cls, size, seed, workers, difficulty)
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists, is not empty and is not a synthetic benchmark; choose another "
                        f"data.synthetic.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for cls in adapters:
            _write(cls, staging / cls.synthetic.folder, size, seed, workers, difficulty)
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


def generated_with(root: Path) -> dict | None:
    """The parameters the benchmark under `root` was generated with (its marker), or None."""
    marker = root / MARKER
    if not marker.exists():
        return None
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{marker}: not a synthetic benchmark's marker ({e}); delete the folder to regenerate it") \
            from None
    if not isinstance(found, dict):
        raise UserError(f"{marker}: not a synthetic benchmark's marker (a JSON {type(found).__name__})")
    return found


def _refuse(root: Path, found: dict, params: dict) -> NoReturn:
    raise UserError(f"{root} holds a synthetic benchmark made with {found}, not {params}; "
                    f"choose another data.synthetic.root or delete it")


def _write(adapter, folder: Path, size: str, seed: int, workers: int, difficulty: str) -> None:
    module, _, function = adapter.synthetic.writer.partition(":")
    write = getattr(importlib.import_module(module), function)
    try:
        inspect.signature(write).bind(folder, adapter.synthetic.counts[size], seed, workers, difficulty)
    except TypeError as e:
        raise UserError(f"{adapter.synthetic.writer}, the synthetic writer of {adapter.name}, does not take "
                        f"(folder, count, seed, workers, difficulty): {e}") from None
    started = time.perf_counter()
    count = adapter.synthetic.counts[size]
    note(f"generating the synthetic {adapter.name} ({count} samples, size {size}, seed {seed})")
    write(folder, adapter.synthetic.counts[size], seed, workers, difficulty)
    note(f"generated the synthetic {adapter.name} in {time.perf_counter() - started:.1f} s")


def _add_dataset(root: Path, adapter, size: str, seed: int, workers: int, difficulty: str) -> None:
    """Write one more dataset's copy into an existing benchmark (staged, then renamed into place) and record
    it in the marker."""
    target = root / adapter.synthetic.folder
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{adapter.synthetic.folder}-", dir=root))
        try:
            # staged under its own folder name, which some formats write into their files (CheXpert's `Path`)
            _write(adapter, staging / adapter.synthetic.folder, size, seed, workers, difficulty)
            os.replace(staging / adapter.synthetic.folder, target)
        except OSError:
            if not target.exists():  # not another process that finished first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    found = json.loads((root / MARKER).read_text())
    found["counts"][adapter.name] = adapter.synthetic.counts[size]
    atomic_write_text(root / MARKER, json.dumps(found))
