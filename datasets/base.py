"""The common manifest and the task description every evaluator consumes.

A manifest is a pandas DataFrame with one row per image: `sample_id`, `patient_id`, `image_path`
(absolute), `split` (train/val/test), one float column per label of the task, and `report` where the
dataset has reports. Splits are patient-disjoint.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
from omegaconf import DictConfig

from bench.errors import UserError



@dataclass(frozen=True)
class Task:
    labels: list[str]
    multilabel: bool
    metric: str  # the metric the field reports for this dataset (DATASETS.md §11)
    prompts: dict[str, list[str]] = field(default_factory=dict)  # class -> positive prompts
    negative_prompts: dict[str, list[str]] = field(default_factory=dict)  # class -> "no <finding>" prompts


class Adapter:
    """Reads a dataset root into a manifest. Subclasses set `name`, `task` and implement `read`."""

    name: ClassVar[str] = ""
    task: ClassVar[Task]

    def __init__(self, root: str | Path, cfg: DictConfig | None = None):
        self.root = Path(root).expanduser()
        self.cfg = cfg
        if not self.root.is_dir():
            raise UserError(f"{self.name}: data root {self.root} does not exist")

    def read(self) -> pd.DataFrame:
        raise NotImplementedError

    def require(self, *names: str) -> Path:
        """The first of `names` that exists under the root, or a clear error naming what is missing."""
        for name in names:
            if (self.root / name).exists():
                return self.root / name
        raise UserError(f"{self.name}: {self.root} has none of {', '.join(names)}")


def split_hashes(manifest: pd.DataFrame) -> dict[str, str]:
    """SHA-256 of each split's sorted sample ids: records carry them so results name their exact data."""
    out = {}
    for split, ids in manifest.groupby("split")["sample_id"]:
        out[str(split)] = hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()
    return out


def patient_fold(patient_id: str, salt: str) -> float:
    """A stable number in [0, 1) per patient: deterministic, patient-disjoint splits without stored state."""
    digest = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS[cls.name] = cls
    return cls


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(name: str) -> type[Adapter]:
    if name not in _ADAPTERS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(adapter_names())}")
    return _ADAPTERS[name]


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with one-line errors naming the file (gzip is recognised by the suffix)."""
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from None


def require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")

