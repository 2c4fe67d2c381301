"""Uncertainty and significance of benchmark numbers: bootstrap intervals over test samples, intervals of a
mean over training seeds, paired comparisons of two methods on one test set, DeLong's test for ROC AUC,
and Holm's correction for multiple comparisons.

Bootstrap resample b of a test set of n samples depends on (n, b, seed) only, never on the scores, so
replicate b of every record on the same test set was computed on the same resample. That is what makes
the stored replicates of two records directly comparable (paired), and lets replicates of several
training seeds be combined draw by draw (`combined_ci`, `paired_bootstrap`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata

from bench.evaluation.metrics import WeightedMetrics, task_arrays

# resamples are evaluated in chunks of at most this many (resample, sample) weights, to bound memory
_CHUNK_CELLS = 5_000_000


def resample_indices(n: int, resample: int, seed: int = 0) -> np.ndarray:
    """The sample indices of bootstrap resample `resample` of n samples: n draws with replacement."""
    return np.random.default_rng([seed, resample]).integers(0, n, n)


def _resample_counts(n: int, start: int, stop: int, seed: int) -> np.ndarray:
    """(stop - start, n) draw counts: how often each sample is in resamples start..stop-1."""
    counts = np.empty((stop - start, n))
    for row, b in enumerate(range(start, stop)):
        counts[row] = np.bincount(resample_indices(n, b, seed), minlength=n)
    return counts


def percentile_ci(values: np.ndarray, confidence: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] of the finite values; [NaN, NaN] if there are none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap(kind: str, y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None,
              resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Percentile bootstrap over test samples of every macro metric `task_metrics` reports for these inputs.

    Rows are resampled with replacement; the thresholds stay fixed (they came from validation). Returns
    {"resamples", "seed", "confidence", "ci": {metric: [lo, hi]}, "replicates": {metric: (resamples,)}}.
    A resample where a metric is undefined (AUC of a class drawn with one label value only in every class)
    gives NaN for it, and the interval uses the finite replicates.
    """
    if resamples < 1:
        raise ValueError(f"need at least one resample, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    metrics = WeightedMetrics(kind, y, scores, thresholds)
    replicates = {name: np.empty(resamples) for name in metrics.names}
    chunk = max(1, _CHUNK_CELLS // metrics.n)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        macro_values, _ = metrics(_resample_counts(metrics.n, start, stop, seed))
        for name, values in macro_values.items():
            replicates[name][start:stop] = values
    return {"resamples": resamples, "seed": seed, "confidence": confidence,
            "ci": {name: percentile_ci(values, confidence) for name, values in replicates.items()},
            "replicates": replicates}


def _replicate_matrix(replicates: Sequence[np.ndarray]) -> np.ndarray:
    """(seeds, resamples) from one replicate array per seed, all of one length."""
    if not len(replicates):
        raise ValueError("need the replicates of at least one seed")
    lengths = {len(np.ravel(r)) for r in replicates}
    if len(lengths) != 1:
        raise ValueError(f"replicates of one comparison must share their resamples, got lengths {sorted(lengths)}")
    return np.stack([np.asarray(r, dtype=float).ravel() for r in replicates])


def _seed_means(replicates: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """Two-level bootstrap of the mean over seeds: draw d picks as many seeds as there are, with replacement,
    and averages their replicate d (cycling through the resamples if draws outnumber them). The picked
    seeds share test resample d, as seeds evaluated on one test set share its sampling error."""
    seeds, resamples = replicates.shape
    picks = rng.integers(0, seeds, (draws, seeds))
    return replicates[picks, (np.arange(draws) % resamples)[:, None]].mean(axis=1)


def combined_ci(replicates: list[np.ndarray], confidence: float = 0.95, seed: int = 0,
                draws: int | None = None) -> tuple[float, float]:
    """Interval of the mean over training seeds that combines seed variation and test resampling.

    `replicates[s]` are the bootstrap replicates of seed s's record (from the same resample index sets);
    `draws` defaults to their number. With one seed, or seeds whose replicates are equal, this is the
    single record's percentile interval.
    """
    matrix = _replicate_matrix(replicates)
    means = _seed_means(matrix, np.random.default_rng(seed), draws or matrix.shape[1])
    lo, hi = percentile_ci(means, confidence)
    return lo, hi


def paired_bootstrap(replicates_a: list[np.ndarray], replicates_b: list[np.ndarray], seed: int = 0,
                     point_a: Sequence[float] | None = None, point_b: Sequence[float] | None = None,
                     confidence: float = 0.95, draws: int | None = None) -> dict:
    """Paired comparison of methods A and B on the same test set from their stored bootstrap replicates.

    One replicate array per training seed on each side (they may differ in number of seeds); replicate b of
    every array must come from the same test resample. Draw d resamples the seeds of each side (as in
    `combined_ci`) and takes mean_A[d] - mean_B[d]; a shared test resample cancels from the difference, which
    is what makes the comparison paired. Returns {"delta", "ci": [lo, hi], "p", "draws"}: delta is
    mean(point_a) - mean(point_b) where the records' point values are given, else the difference of the
    seed-means of the replicates; p is two-sided, min(1, 2 min(P(d <= 0), P(d >= 0))) over the finite draws,
    each P as (count + 1) / (draws + 1) so that it is never 0.
    """
    a, b = _replicate_matrix(replicates_a), _replicate_matrix(replicates_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sides have {a.shape[1]} and {b.shape[1]} replicates; they must share resamples")
    draws = draws or a.shape[1]
    rng = np.random.default_rng(seed)
    difference = _seed_means(a, rng, draws) - _seed_means(b, rng, draws)
    if (point_a is None) != (point_b is None):
        raise ValueError("give the point values of both sides or of neither")
    if point_a is not None:
        delta = float(np.mean(point_a) - np.mean(point_b))
    else:
        delta = float(np.nanmean(a.mean(axis=0) - b.mean(axis=0)))
    finite = difference[np.isfinite(difference)]
    if len(finite):
        tail = min((finite <= 0).sum() + 1, (finite >= 0).sum() + 1) / (len(finite) + 1)
        p = float(min(1.0, 2 * tail))
    else:
        p = float("nan")
    return {"delta": delta, "ci": percentile_ci(finite, confidence), "p": p, "draws": draws}


def _structural_components(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of each model's AUC (fast form of Sun & Xu 2014, by midranks).

    scores: (models, n). V10[k, i]: the share of negatives that positive i outscores under model k (ties
    half); V01[k, j]: the share of positives that outscore negative j. Both average to the AUC."""
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    combined = rankdata(scores, axis=1)
    v10 = (combined[:, positive] - rankdata(x, axis=1)) / n
    v01 = 1 - (combined[:, ~positive] - rankdata(y, axis=1)) / m
    return v10, v01


def _scaled_deviation(values: np.ndarray, mean: float) -> np.ndarray:
    """(values - mean) / sqrt(k (k - 1)): squared and summed, the variance of the mean of k values (ddof=1).
    A group of one sample has no estimable variance and contributes nothing."""
    k = len(values)
    return (values - mean) / np.sqrt(k * (k - 1)) if k > 1 else np.zeros(k)


def delong(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test for the difference in (macro) ROC AUC of two models scored on the same samples.

    y, scores_a, scores_b: (n, C) or (n,); for a multi-class task pass the one-hot y (one-vs-rest per
    class). With one class this is DeLong et al. (1988): var(diff) = S_aa + S_bb - 2 S_ab with
    S = S10 / m + S01 / n. With several, the macro difference is the mean of the classes' differences over
    the classes where AUC is defined, and its variance sums each sample's squared influence on it: on class
    c's difference a positive has influence (dV10_i - dAUC_c) / sqrt(m_c (m_c - 1)), a negative
    (dV01_i - dAUC_c) / sqrt(n_c (n_c - 1)), and a sample's influence on the macro is the mean over classes.
    Returns {"delta", "se", "z", "p", "auc_a", "auc_b"} (two-sided normal p; NaN if no class is defined).
    """
    y, a = task_arrays("multi-label", y, scores_a)
    _, b = task_arrays("multi-label", y, scores_b)
    positives = y.sum(axis=0)
    defined = np.flatnonzero((positives > 0) & (positives < len(y)))
    if not len(defined):
        nan = float("nan")
        return {"delta": nan, "se": nan, "z": nan, "p": nan, "auc_a": nan, "auc_b": nan}
    influence = np.zeros(len(y))
    aucs = np.zeros((len(defined), 2))
    for row, c in enumerate(defined):
        positive = y[:, c] > 0.5
        v10, v01 = _structural_components(positive, np.stack([a[:, c], b[:, c]]))
        aucs[row] = v10.mean(axis=1)
        difference = aucs[row, 0] - aucs[row, 1]
        influence[positive] += _scaled_deviation(v10[0] - v10[1], difference)
        influence[~positive] += _scaled_deviation(v01[0] - v01[1], difference)
    influence /= len(defined)
    auc_a, auc_b = aucs.mean(axis=0)
    delta = float(auc_a - auc_b)
    se = float(np.sqrt(np.sum(influence**2)))
    if se > 0:
        z = delta / se
        p = float(2 * norm.sf(abs(z)))
    elif delta == 0:  # the models order every (positive, negative) pair alike: nothing to test
        z, p = 0.0, 1.0
    else:  # a difference without estimable variance (too few samples) has no p-value
        z = p = float("nan")
    return {"delta": delta, "se": se, "z": float(z), "p": p, "auc_a": float(auc_a), "auc_b": float(auc_b)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order. NaN stays NaN and does not count among the m tests;
    adjusted values are monotone in the raw ones and capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    # the i-th smallest (from 0) is multiplied by m - i; a running maximum keeps the order monotone
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return [float(v) for v in adjusted]


def significance_marker(p_adjusted: float) -> str:
    """"***" below 0.001, "**" below 0.01, "*" below 0.05, else (or NaN) ""."""
    if not p_adjusted < 0.05:
        return ""
    return "***" if p_adjusted < 0.001 else "**" if p_adjusted < 0.01 else "*"
