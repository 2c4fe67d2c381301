"""Frozen split files: every split of a manifest, and label fractions of its train split, as id lists.

Files live in `<splits_dir>/<dataset>/<content hash>/`: `train.txt`, `val.txt`, `test.txt` (and any named
evaluation set, e.g. `5x200.txt`), `train_1.txt`, `train_10.txt` (1% and 10% of train; other fractions on
first use; `train_1_seed3.txt` where each evaluation seed draws its own subset), one sample id per line,
sorted, with `SHA256SUMS` beside them. The folder name hashes the
manifest's (sample id, split) assignment, so a changed dataset never reuses stale lists, and an unchanged
one reuses the same files run after run. Fractions are nested (1% within 10%), drawn with a fixed seed,
and stratified by class for binary and multi-class tasks (as BenchX does); multi-label tasks, where no
single stratum exists, take a plain random sample (as MGCA/MRM do). Each class keeps at least one sample.
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.core.io import UnwritableDestination, atomic_write_text
from bench.data.adapter import Task

FRACTION_SEED = 42
DEFAULT_FRACTIONS = (0.01, 0.1)
SUMS = "SHA256SUMS"


class SealedSplit(UserError):
    """A sealed split (the test split during a sweep) was asked for."""


_SEALED: ContextVar[frozenset[str]] = ContextVar("sealed_splits", default=frozenset())


@contextmanager
def sealed(*splits: str) -> Iterator[None]:
    """Within this block no split file of these splits can be read, by any dataset: a sweep seals `test`, so
    no tuning decision can see a test sample."""
    token = _SEALED.set(_SEALED.get() | frozenset(splits))
    try:
        yield
    finally:
        _SEALED.reset(token)


def fraction_file(fraction: float, subset_seed: int | None = None) -> str:
    """`train_10.txt` for 10% (the fixed subset every seed shares), `train_10_seed3.txt` for seed 3's own."""
    if not 0 < fraction <= 1:
        raise UserError(f"a label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return "train.txt"
    pct = fraction * 100
    seed = "" if subset_seed is None else f"_seed{subset_seed}"
    return f"train_{int(pct) if float(pct).is_integer() else f'{pct:g}'}{seed}.txt"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ids_text(ids) -> str:
    return "".join(f"{i}\n" for i in sorted(map(str, ids)))


def _strata(train: pd.DataFrame, task: Task) -> list[np.ndarray]:
    if task.multilabel and len(task.labels) > 1:
        return [np.arange(len(train))]
    y = train[task.labels].to_numpy(dtype=float)
    key = y[:, 0] if len(task.labels) == 1 else y.argmax(1)
    return [np.flatnonzero(key == k) for k in np.unique(key)]


def fraction_ids(train: pd.DataFrame, task: Task, fraction: float, seed: int = FRACTION_SEED) -> list[str]:
    """The sample ids of a `fraction` of `train`: nested across fractions of one seed, stratified where it
    can be, and independent of the manifest's row order."""
    train = train.sort_values("sample_id", key=lambda ids: ids.astype(str))
    rng = np.random.default_rng(seed)
    chosen = []
    for rows in _strata(train, task):
        order = rows[rng.permutation(len(rows))]
        chosen.extend(order[:max(1, math.floor(fraction * len(rows) + 0.5))])
    return train["sample_id"].iloc[sorted(chosen)].astype(str).tolist()


@dataclass
class SplitFiles:
    """The split files of one manifest, and a log of which of them an evaluation used."""

    directory: Path
    manifest: pd.DataFrame
    task: Task
    used: dict[str, str] = field(default_factory=dict)

    def _sums(self) -> dict[str, str]:
        path = self.directory / SUMS
        if not path.exists():
            return {}
        pairs = [line.split("  ", 1) for line in path.read_text().splitlines() if line.strip()]
        if any(len(p) != 2 for p in pairs):
            raise UserError(f"{path}: not a SHA256SUMS file (lines are '<sha256>  <file>'); delete the folder "
                            f"to rebuild it")
        return {name: digest for digest, name in pairs}

    def _record(self, name: str, digest: str) -> None:
        sums = self._sums()
        sums[name] = digest
        atomic_write_text(self.directory / SUMS, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))

    def _file(self, name: str, ids) -> str:
        """Write `name` unless it exists; check an existing one against its recorded hash (a list
        dropped in by hand is adopted and its hash recorded)."""
        path = self.directory / name
        try:  # a read-only folder is fine once every file is there: only a missing one is written
            if not path.exists():
                text = _ids_text(ids)
                atomic_write_text(path, text)
                self._record(name, _sha256(text))
            digest, recorded = _sha256(path.read_text()), self._sums().get(name)
            if recorded is None:
                self._record(name, digest)
        except UnwritableDestination as exc:
            raise UnwritableDestination(f"data.splits_dir: {exc}") from None
        if recorded is not None and digest != recorded:
            raise UserError(f"{path}: split file changed since it was written (SHA-256 {digest[:12]}, "
                            f"recorded {recorded[:12]}); delete the folder to rebuild it")
        return digest

    def rows(self, split: str, fraction: float = 1.0, subset_seed: int | None = None) -> pd.DataFrame:
        """The manifest rows listed in the split's file (a fraction's file for `train`; with `subset_seed`,
        that seed's own subset, written on first use), in manifest order."""
        if split != "train" and fraction != 1.0:
            raise ValueError("fractions apply to the train split only")
        if split in _SEALED.get():
            raise SealedSplit(f"the {split} split of {self.directory.parent.name} is sealed here (a sweep tunes on "
                              f"validation only); evaluate on it with `bench sweep --finalize`")
        name = fraction_file(fraction, subset_seed) if split == "train" else f"{split}.txt"
        train = self.manifest[self.manifest["split"] == "train"]
        seed = FRACTION_SEED if subset_seed is None else subset_seed
        self.used[name] = self._file(name, fraction_ids(train, self.task, fraction, seed) if fraction < 1 else [])
        ids = set((self.directory / name).read_text().splitlines())
        rows = self.manifest[self.manifest["sample_id"].astype(str).isin(ids)]
        if len(rows) != len(ids):
            raise UserError(f"{self.directory / name}: lists {len(ids) - len(rows)} sample(s) absent from "
                            f"the dataset")
        return rows.reset_index(drop=True)


def materialise(manifest: pd.DataFrame, task: Task, dataset: str, splits_dir: str | Path) -> SplitFiles:
    """Write (once) and return the split files of `manifest`."""
    # the key covers what the files are drawn from: ids, splits, the labels that stratify, the seed
    columns = ["sample_id", "split", *task.labels]
    assignment = manifest[columns].astype(str).sort_values(["split", "sample_id"])
    lines = "".join("\t".join(row) + "\n" for row in assignment.itertuples(index=False))
    key = _sha256(f"seed {FRACTION_SEED}\n{lines}")[:16]
    files = SplitFiles(Path(splits_dir).expanduser() / dataset / key, manifest, task)
    for split, ids in manifest.groupby("split")["sample_id"]:
        files._file(f"{split}.txt", ids)
    train = manifest[manifest["split"] == "train"]
    if len(train):
        for fraction in DEFAULT_FRACTIONS:
            files._file(fraction_file(fraction), fraction_ids(train, task, fraction))
    return files
