"""What every protocol hands back, and how it becomes a record's numbers: metrics over the whole test split,
thresholds from validation only, bootstrap CIs over test samples, per-sample predictions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.data.adapter import Task
from bench.evaluation.features import ids_sha256, predictions_frame
from bench.evaluation.metrics import choose_thresholds, task_metrics
from bench.evaluation.stats import bootstrap, bootstrap_means, rare_classes


def val_thresholds(task: Task, y_val: np.ndarray, scores_val: np.ndarray) -> np.ndarray | None:
    """Per-class decision thresholds chosen on validation (max F1) for binary and multi-label tasks; None
    for multi-class tasks (arg-max) or without validation samples."""
    if task.kind == "multi-class" or len(y_val) == 0:
        return None
    return choose_thresholds(y_val, scores_val)


def split_labels(task: Task, parts: dict[str, pd.DataFrame], protocol: str, dataset: str) -> dict[str, np.ndarray]:
    """Each split's label array, once every split is known to have rows and a multi-class task's training
    rows to be single-label."""
    for split, rows in parts.items():
        if rows.empty:
            raise UserError(f"{protocol}: the {split} split of {dataset} is empty")
    y = {split: rows[task.labels].to_numpy(dtype=float) for split, rows in parts.items()}
    if task.kind == "multi-class" and not (y["train"].sum(1) == 1).all():
        raise UserError(f"{protocol}: {dataset}'s train split is not single-label, so it cannot train its "
                        f"multi-class task (evaluate it zero-shot)")
    return y


@dataclass
class ProtocolResult:
    task: Task
    test_rows: pd.DataFrame
    y: np.ndarray  # test truth, (n, classes)
    scores: np.ndarray  # test scores, (n, classes)
    thresholds: np.ndarray | None  # from validation
    chosen: dict[str, Any] = field(default_factory=dict)  # what the protocol chose on validation
    extra: dict[str, Any] = field(default_factory=dict)  # protocol-specific record fields
    timing: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The point estimates of its metrics over the whole split (what a sweep's objective reads)."""
        return task_metrics(self.task.kind, self.y, self.scores, self.task.labels, self.thresholds)[0]

    def numbers(self, boot: DictConfig) -> dict:
        """The record's metrics, per-class metrics and bootstrap (CIs and replicates, as lists)."""
        labels = self.task.labels
        metrics, per_class = task_metrics(self.task.kind, self.y, self.scores, labels, self.thresholds)
        draws = bootstrap(self.task.kind, self.y, self.scores, self.thresholds, int(boot.resamples),
                          int(boot.seed), float(boot.confidence))
        chosen = dict(self.chosen)
        if self.thresholds is not None:
            chosen["thresholds"] = {c: float(t) for c, t in zip(labels, self.thresholds)}
        return {
            "metrics": metrics, "per_class": per_class, "n_test": len(self.y), "chosen": chosen,
            "rare_classes": rare_classes(self.y, labels),
            "bootstrap": {"resamples": draws["resamples"], "seed": draws["seed"], "confidence": draws["confidence"],
                          "test_ids_sha256": ids_sha256(self.test_rows["sample_id"]),
                          "ci": draws["ci"],
                          "replicates": {k: [round(float(v), 6) for v in r] for k, r in draws["replicates"].items()}},
            **self.extra,
        }

    def predictions(self) -> pd.DataFrame:
        return predictions_frame(self.test_rows, self.task, self.y, self.scores)


@dataclass
class SampleMeanResult:
    """What a protocol whose metrics are means of per-sample values hands back (segmentation's Dice per image,
    retrieval's hit per query): `values` (metric -> one value per sample of its own; NaN where the metric does
    not cover the sample), the samples' ids in order (one test set: what paired comparisons check), and the
    per-sample predictions from which every value recomputes."""

    values: dict[str, np.ndarray]
    test_ids: list[str]
    prediction_frame: pd.DataFrame
    n_test: int | dict[str, int]
    chosen: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Each metric's mean over the samples it covers (NaN where it covers none)."""
        out = {}
        for name, v in self.values.items():
            v = np.asarray(v, dtype=float)
            out[name] = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
        return out

    def numbers(self, boot: DictConfig) -> dict:
        draws = bootstrap_means(self.values, int(boot.resamples), int(boot.seed), float(boot.confidence))
        return {
            "metrics": self.metrics(), "per_class": {}, "n_test": self.n_test, "chosen": dict(self.chosen),
            "rare_classes": {},
            "bootstrap": {"resamples": draws["resamples"], "seed": draws["seed"], "confidence": draws["confidence"],
                          "test_ids_sha256": ids_sha256(self.test_ids), "ci": draws["ci"],
                          "replicates": {k: [round(float(v), 6) for v in r] for k, r in draws["replicates"].items()}},
            **self.extra,
        }

    def predictions(self) -> pd.DataFrame:
        return self.prediction_frame
