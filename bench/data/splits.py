"""Frozen split files: every split of a manifest, and label fractions of its train split, as id lists.

Files live in `<splits_dir>/<dataset>/<content hash>/`: `train.txt`, `val.txt`, `test.txt` (and any named
evaluation set, e.g. `5x200.txt`), `train_1.txt`, `train_10.txt` (1% and 10% of train; other fractions on
first use; `train_1_seed3.txt` where each evaluation seed draws its own subset), one sample id per line,
sorted, with `SHA256SUMS` beside them. The folder name hashes the
manifest's (sample id, patient id, split, labels) assignment and the rule that draws fractions
(`FRACTION_RULE`), so a changed dataset or rule never reuses stale lists, and an unchanged one reuses the
same files run after run.

A fraction is drawn by patient: a share of the training patients with all their images, so that the images
of one patient never stand in for independent samples (a manifest without patient ids counts each image as
its own patient). Fractions are nested (1% within 10%), drawn with a fixed seed, independent of the
manifest's row order, and stratified by class for binary and multi-class tasks (as BenchX does): a patient's
stratum is, for a binary task, whether any of their images is positive and, for a multi-class task, their
most frequent class (ties: the first in label order). Multi-label tasks, where no single stratum exists,
take a plain random sample of patients (as MGCA/MRM do). Every class keeps at least one sample: the first
patient in the drawn order holding a positive of each class (for binary tasks, also a negative) comes first
in its stratum, so it is in every fraction and the fractions stay nested.
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
# part of the split folder's key: a changed drawing rule gets new folders and never reuses old lists (v1 drew
# images, not patients)
FRACTION_RULE = "fractions by patient v2"
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


def _patients(train: pd.DataFrame) -> np.ndarray:
    """Each row's patient; a row without one (or a manifest without the column) is its own patient."""
    own = ("sample:" + train["sample_id"].astype(str)).to_numpy()
    if "patient_id" not in train:
        return own
    return np.where(train["patient_id"].notna(), train["patient_id"].astype(str).to_numpy(), own)


def _strata(sums: np.ndarray, task: Task) -> list[np.ndarray]:
    """Patient indices per stratum, from each patient's label sums over their images."""
    if task.multilabel and len(task.labels) > 1:
        return [np.arange(len(sums))]
    key = sums[:, 0] > 0 if len(task.labels) == 1 else sums.argmax(1)
    return [np.flatnonzero(key == k) for k in np.unique(key)]


def fraction_ids(train: pd.DataFrame, task: Task, fraction: float, seed: int = FRACTION_SEED) -> list[str]:
    """The sample ids of a `fraction` of `train`'s patients with all their images: nested across fractions of
    one seed, stratified where it can be, every class kept, and independent of the manifest's row order."""
    y = train[task.labels].to_numpy(dtype=float) > 0.5
    patients, patient_of = np.unique(_patients(train), return_inverse=True)  # sorted: no dependence on row order
    holds = np.concatenate([y, ~y], axis=1) if len(task.labels) == 1 else y
    sums = np.zeros((len(patients), holds.shape[1]))
    np.add.at(sums, patient_of, holds)
    rank = np.empty(len(patients), dtype=int)
    rank[np.random.default_rng(seed).permutation(len(patients))] = np.arange(len(patients))
    # per class, the first patient in the drawn order who has it: taken first, whatever the fraction
    anchors = {int(np.flatnonzero(column)[np.argmin(rank[column])]) for column in (sums > 0).T if column.any()}
    chosen = []
    for stratum in _strata(sums, task):
        ordered = stratum[np.argsort(rank[stratum])]
        first = np.isin(ordered, list(anchors))
        ordered = np.concatenate([ordered[first], ordered[~first]])
        chosen.extend(ordered[:max(1, int(first.sum()), math.floor(fraction * len(ordered) + 0.5))])
    rows = np.isin(patient_of, chosen)
    return sorted(train["sample_id"].astype(str).to_numpy()[rows].tolist())


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
    # the key covers what the files are drawn from: ids, patients, splits, the labels that stratify, the seed
    # and the drawing rule
    columns = ["sample_id", "split", *(["patient_id"] if "patient_id" in manifest else []), *task.labels]
    assignment = manifest[columns].astype(str).sort_values(["split", "sample_id"])
    lines = "".join("\t".join(row) + "\n" for row in assignment.itertuples(index=False))
    key = _sha256(f"seed {FRACTION_SEED}\n{FRACTION_RULE}\n{lines}")[:16]
    files = SplitFiles(Path(splits_dir).expanduser() / dataset / key, manifest, task)
    for split, ids in manifest.groupby("split")["sample_id"]:
        files._file(f"{split}.txt", ids)
    train = manifest[manifest["split"] == "train"]
    if len(train):
        for fraction in DEFAULT_FRACTIONS:
            files._file(fraction_file(fraction), fraction_ids(train, task, fraction))
    return files
