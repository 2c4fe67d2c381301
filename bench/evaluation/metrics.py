"""Classification metrics over a whole split (never averaged over batches), per class and macro.

A task is "binary" (one 0/1 label column), "multi-label" (C independent 0/1 columns) or "multi-class"
(C one-hot columns; the predicted class is the arg-max of the scores). `y` and `scores` are (n, C) arrays.
Every metric equals scikit-learn's on the same inputs:

- auc: ROC AUC per class (one-vs-rest for multi-class); NaN for a class whose truth has one value only,
  which the macro leaves out. The macro averages one fixed set of classes, those defined on the whole split
  (under unit weights): a weighting in which one of them has one label value only (a bootstrap resample that
  drew none of a rare class's positives) gives a NaN macro rather than the mean of fewer classes, so every
  bootstrap replicate is the same quantity as the point estimate.
- binary / multi-label, at per-class thresholds chosen on the validation split (`choose_thresholds`):
  f1 (`f1_score`, zero_division=0), acc (`accuracy_score`) and mcc (`matthews_corrcoef`, which is 0 where
  its denominator is) per class; the macro is the mean over the classes.
- multi-class, of the arg-max prediction: acc, macro F1 over all classes (and F1 per class), and the
  multi-class MCC.

All of them are computed from sample weights by `WeightedMetrics`: unit weights give the point estimates
(`task_metrics`), and bootstrap counts (how often each sample was drawn) give the metrics of a resample
without building it, for many resamples at once (bench/evaluation/stats.py). One implementation serves both, so a
bootstrap replicate is computed exactly like the number it is an interval for.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix

# the macro metrics of each task kind, in display order
METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "f1", "acc", "mcc"),
    "multi-label": ("auc", "f1", "acc", "mcc"),
    "multi-class": ("auc", "acc", "f1", "mcc"),
}


def accuracy(y_onehot: np.ndarray, scores: np.ndarray) -> float:
    """Arg-max accuracy of a multi-class task; NaN on an empty split."""
    return float((y_onehot.argmax(1) == scores.argmax(1)).mean()) if len(y_onehot) else float("nan")


def task_arrays(kind: str, y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`y` and `scores` as (n, C) float arrays, checked against the task kind (ValueError if they do not fit)."""
    if kind not in METRICS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(METRICS)}")
    y, scores = _as_2d(y), _as_2d(scores)
    if y.shape != scores.shape:
        raise ValueError(f"labels {y.shape} and scores {scores.shape} differ in shape")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if kind == "binary" and y.shape[1] != 1:
        raise ValueError(f"a binary task has one label column, got {y.shape[1]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if kind == "multi-class" and not (y.sum(1) == 1).all():
        raise ValueError("a multi-class task needs exactly one positive label per sample")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return y, scores


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a[:, None] if a.ndim == 1 else a


def choose_thresholds(y_val: np.ndarray, scores_val: np.ndarray) -> np.ndarray:
    """Per class, the score threshold that maximises F1 on the validation split (positive: score >= threshold).

    Among thresholds of equal F1 the highest wins (the fewest predicted positives), which makes the choice
    deterministic and, for a class without positives in val (F1 is 0 whatever the threshold), predicts
    negative for every val sample. A threshold is never a val score: it lies midway between the lowest
    score predicted positive and the next lower distinct score, so val predictions are exactly those of the
    optimum while unseen scores in the gap split evenly. Past either end of the val scores the adjacent gap
    is mirrored (half a gap beyond the extreme score; 0.5 if all val scores are equal). Always finite.
    """
    y, scores = _as_2d(y_val), _as_2d(scores_val)
    if y.shape != scores.shape or len(y) == 0:
        raise ValueError(f"need non-empty labels and scores of one shape, got {y.shape} and {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return np.array([_max_f1_threshold(y[:, c] > 0.5, scores[:, c]) for c in range(y.shape[1])])


def _max_f1_threshold(truth: np.ndarray, score: np.ndarray) -> float:
    levels, level_of = np.unique(score, return_inverse=True)
    # candidate 0 predicts nothing positive, candidate i >= 1 everything from the i-th highest level up;
    # true and predicted positives of the candidates are cumulative sums from the top level down
    tp = np.concatenate([[0.0], np.cumsum(np.bincount(level_of, weights=truth, minlength=len(levels))[::-1])])
    predicted = np.concatenate([[0], np.cumsum(np.bincount(level_of, minlength=len(levels))[::-1])])
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted positives + actual positives)
    denominator = predicted + truth.sum()
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold

    low_gap, high_gap = (levels[1] - levels[0], levels[-1] - levels[-2]) if len(levels) > 1 else (1.0, 1.0)
    if best == 0:
        return float(levels[-1] + high_gap / 2)
    lowest = len(levels) - best  # index of the lowest level predicted positive
    if lowest == 0:
        return float(levels[0] - low_gap / 2)
    lower, upper = levels[lowest - 1], levels[lowest]
    middle = (lower + upper) / 2
    return float(middle if middle > lower else upper)  # adjacent floats have no midpoint


class WeightedMetrics:
    """The metrics of one task's predictions under many sample weightings at once.

    Weights are non-negative integer counts of shape (B, n): row b stands for the multiset holding sample i
    weights[b, i] times, and every metric of row b equals that of the explicitly repeated samples. All that
    depends on the predictions only (score order, thresholded or arg-max predictions) is prepared here,
    once, so that a weighting costs a few passes over n per class.
    """

    def __init__(self, kind: str, y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None = None):
        y, scores = task_arrays(kind, y, scores)
        self.kind = kind
        self.n, self.n_classes = y.shape
        self._auc = [_WeightedAuc(y[:, c] > 0.5, scores[:, c]) for c in range(self.n_classes)]
        positives = y.sum(axis=0)
        # the classes the macro AUC averages under every weighting: those of the point estimate
        self.auc_classes = np.flatnonzero((positives > 0) & (positives < self.n))
        self._confusion: np.ndarray | None = None
        if kind == "multi-class":
            # the weighted confusion matrix is the weight summed over each (true, predicted) pair present
            pair = y.argmax(1) * self.n_classes + scores.argmax(1)
            self._pairs, pair_column = np.unique(pair, return_inverse=True)
            self._confusion = np.zeros((self.n, len(self._pairs)))
            self._confusion[np.arange(self.n), pair_column] = 1.0
            self.names = METRICS[kind]
        elif thresholds is not None:
            thresholds = np.asarray(thresholds, dtype=float).reshape(-1)
            if thresholds.shape != (self.n_classes,) or np.isnan(thresholds).any():
                raise ValueError(f"need one threshold per class ({self.n_classes}), got {thresholds}")
            predicted = scores >= thresholds
            # weighted true positives, false positives and positives of every class in one product
            self._confusion = np.concatenate([y * predicted, (1 - y) * predicted, y], axis=1)
            self.names = METRICS[kind]
        else:
            self.names = ("auc",)

    def __call__(self, weights: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Macro metrics {name: (B,)} and per-class metrics {name: (B, C)} of each weighting."""
        weights = np.asarray(weights, dtype=float)
        if weights.ndim != 2 or weights.shape[1] != self.n:
            raise ValueError(f"weights must have shape (B, {self.n}), got {weights.shape}")
        if (weights < 0).any() or not (weights.sum(axis=1) > 0).all():
            raise ValueError("weights must be non-negative counts with a positive total per row")
        # samples along the first axis: gathering and summing over samples then runs over contiguous rows
        by_sample = np.ascontiguousarray(weights.T)
        total = by_sample.sum(axis=0)
        per_class = {"auc": np.stack([auc(by_sample, total) for auc in self._auc], axis=1)}
        macro_values = {"auc": _macro_auc(per_class["auc"], self.auc_classes)}
        if self.kind == "multi-class":
            class_values, overall = self._multi_class(by_sample)
            per_class.update(class_values)
            macro_values.update(overall)
        elif self._confusion is not None:
            class_values = self._thresholded(by_sample, total)
            per_class.update(class_values)
            macro_values.update({name: values.mean(axis=1) for name, values in class_values.items()})
        return {name: macro_values[name] for name in self.names}, per_class

    def _thresholded(self, by_sample: np.ndarray, total: np.ndarray) -> dict[str, np.ndarray]:
        """Per-class F1, accuracy and MCC at the fixed thresholds."""
        tp, fp, positives = np.split(by_sample.T @ self._confusion, 3, axis=1)
        total = total[:, None]
        fn, tn = positives - tp, total - positives - fp
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
        acc = (tp + tn) / total
        true_sums = np.stack([tn + fp, positives], axis=-1)
        predicted_sums = np.stack([tn + fn, tp + fp], axis=-1)
        return {"f1": f1, "acc": acc, "mcc": _mcc(tp + tn, true_sums, predicted_sums, total)}

    def _multi_class(self, by_sample: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-class F1, and the macro F1, accuracy and MCC of the arg-max prediction."""
        c = self.n_classes
        confusion = np.zeros((by_sample.shape[1], c * c))
        confusion[:, self._pairs] = by_sample.T @ self._confusion
        confusion = confusion.reshape(-1, c, c)  # [b, true, predicted]
        correct = np.diagonal(confusion, axis1=1, axis2=2)
        true_sums, predicted_sums = confusion.sum(axis=2), confusion.sum(axis=1)
        total = true_sums.sum(axis=1)
        # a class never true nor predicted has F1 0 (zero_division=0) and still counts in the macro
        f1 = np.divide(2 * correct, true_sums + predicted_sums, out=np.zeros_like(correct),
                       where=true_sums + predicted_sums > 0)
        overall = {"acc": correct.sum(axis=1) / total, "f1": f1.mean(axis=1),
                   "mcc": _mcc(correct.sum(axis=1), true_sums, predicted_sums, total)}
        return {"f1": f1}, overall


class _WeightedAuc:
    """Weighted Mann-Whitney ROC AUC of one class: the weighted share of (positive, negative) pairs that the
    positive outscores, ties counting half.

    One group (the smaller, as its cumulative sum is the costly pass) is sorted by score once. Every sample
    of the other group falls in a slot of that order: after the sorted samples strictly below its score
    (`lo`), or at or below it (`hi`; hi > lo where it ties). With C the cumulative weight of the sorted group,
    twice the weight of pairs a sample outscores is C[lo] + C[hi]; summed over the other group, weighted,
    that is sum_k slot_weight[k] C[k], where a sparse matrix adds each sample's weight into its two slots.
    """

    def __init__(self, truth: np.ndarray, score: np.ndarray):
        positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
        self._positives_slotted = len(positives) >= len(negatives)
        slotted, sorted_group = (positives, negatives) if self._positives_slotted else (negatives, positives)
        self._sorted = sorted_group[np.argsort(score[sorted_group], kind="stable")]
        sorted_scores = score[self._sorted]
        lo = np.searchsorted(sorted_scores, score[slotted], side="left")
        hi = np.searchsorted(sorted_scores, score[slotted], side="right")
        # duplicate (slot, sample) entries add up: a sample tied with nothing weighs twice in its slot
        self._slots = csr_matrix((np.ones(2 * len(slotted)), (np.concatenate([lo, hi]), np.tile(slotted, 2))),
                                 shape=(len(self._sorted) + 1, len(truth)))

    def __call__(self, by_sample: np.ndarray, total: np.ndarray) -> np.ndarray:
        """AUC of each weighting; by_sample: (n, B) weights, total: (B,) their sums."""
        cumulative = np.zeros((len(self._sorted) + 1, by_sample.shape[1]))
        np.cumsum(by_sample[self._sorted], axis=0, out=cumulative[1:])
        beats_twice = np.einsum("kb,kb->b", self._slots @ by_sample, cumulative)
        pairs = (total - cumulative[-1]) * cumulative[-1]
        wins_twice = beats_twice if self._positives_slotted else 2 * pairs - beats_twice
        return np.divide(wins_twice, 2 * pairs, out=np.full(by_sample.shape[1], np.nan), where=pairs > 0)


def _mcc(correct: np.ndarray, true_sums: np.ndarray, predicted_sums: np.ndarray,
         total: np.ndarray) -> np.ndarray:
    """Matthews correlation from confusion sums, as scikit-learn computes it (0 where undefined).

    `correct` and `total` have the leading shape; `true_sums`/`predicted_sums` one more axis, the classes."""
    correct, total = np.broadcast_arrays(correct, total)
    covariance = correct * total - (true_sums * predicted_sums).sum(axis=-1)
    spread = (total**2 - (predicted_sums**2).sum(axis=-1)) * (total**2 - (true_sums**2).sum(axis=-1))
    return np.divide(covariance, np.sqrt(spread), out=np.zeros_like(covariance, dtype=float), where=spread != 0)


def _macro_auc(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Row means over `classes`; NaN for a row where one of them is NaN, or for every row without classes."""
    if not len(classes):
        return np.full(len(values), np.nan)
    return values[:, classes].mean(axis=1)


def task_metrics(kind: str, y: np.ndarray, scores: np.ndarray, labels: list[str],
                 thresholds: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(macro metrics, per-class metrics {metric: {class: value}}) of a task over a whole split.

    Binary and multi-label tasks report f1, acc and mcc only with `thresholds` (one per class, chosen on the
    validation split by `choose_thresholds`), auc always. Multi-class tasks report auc, acc, f1 and mcc of
    the arg-max and ignore `thresholds`; their per-class metrics are auc and f1. Python floats, NaN where
    undefined.
    """
    metrics = WeightedMetrics(kind, y, scores, thresholds)
    if len(labels) != metrics.n_classes:
        raise ValueError(f"{len(labels)} labels for {metrics.n_classes} score columns")
    macro_values, per_class = metrics(np.ones((1, metrics.n)))
    return ({name: float(values[0]) for name, values in macro_values.items()},
            {name: {label: float(v) for label, v in zip(labels, values[0])} for name, values in per_class.items()})
