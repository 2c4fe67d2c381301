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
