"""Metrics over a whole split (never averaged over batches), per class and macro."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_per_class(y_true: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict[str, float]:
    """ROC AUC of each class; NaN where the split holds only one label value for that class."""
    out = {}
    for j, name in enumerate(labels):
        y = y_true[:, j]
        out[name] = float(roc_auc_score(y, scores[:, j])) if len(np.unique(y)) == 2 else float("nan")
    return out


def macro(per_class: dict[str, float]) -> float:
    """Mean over the classes where the metric is defined; NaN if none is."""
    values = [v for v in per_class.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def accuracy(y_onehot: np.ndarray, scores: np.ndarray) -> float:
    return float((y_onehot.argmax(1) == scores.argmax(1)).mean()) if len(y_onehot) else float("nan")


def task_metrics(multiclass: bool, y: np.ndarray, scores: np.ndarray,
                 labels: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Macro AUC (one-vs-rest) for every task, and accuracy of the arg-max class for multi-class tasks."""
    per_class = auc_per_class(y, scores, labels)
    metrics = {"auc": macro(per_class)}
    if multiclass:
        metrics["acc"] = accuracy(y, scores)
    return metrics, {"auc": per_class}
