"""Uncertainty and significance of benchmark numbers: bootstrap intervals over test samples, intervals of a
mean over training seeds, paired comparisons of two methods on one test set, DeLong's test for ROC AUC,
Holm's correction for multiple comparisons, and the classes too rare in a test split for these to be
reliable (`rare_classes`).

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
    The macro AUC of every replicate averages the classes of the point estimate (those defined on the whole
    test split): a resample that draws one of them with one label value only gives NaN, and the interval uses
    the finite replicates. Whether a replicate is NaN depends on the truth and the resample only, never on the
    scores, so all records on one test set have NaN at the same replicates and paired differences stay paired.
    Classes with very few positives make such replicates frequent and the interval fragile: `rare_classes`
    names them for the record.
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



def bootstrap_means(values: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """The percentile bootstrap of metrics that are means of per-sample values (Dice, Recall@K): each metric's
    samples are resampled with `resample_indices` (so two models scored on the same samples are paired), and a
    NaN value (a sample the metric does not cover: Dice on positive images only) is left out of the mean it
    falls in. Returns what `bootstrap` returns."""
    if resamples < 1:
        raise ValueError(f"need at least one resample, got {resamples}")
    replicates = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=float)
        counted = np.isfinite(v)
        filled = np.where(counted, v, 0.0)
        reps = np.empty(resamples)
        for b in range(resamples):
            draw = resample_indices(len(v), b, seed)
            n = counted[draw].sum()
            reps[b] = filled[draw].sum() / n if n else np.nan
        replicates[name] = reps
    return {"resamples": resamples, "seed": seed, "confidence": confidence,
            "ci": {name: percentile_ci(r, confidence) for name, r in replicates.items()}, "replicates": replicates}

# a class with fewer positives (or negatives) than this in the test split is flagged in its records and tables:
# a resample misses all k of them with probability about e^-k (1 in 150 at k = 5, 1 in 7 at k = 2), and its AUC
# rests on a handful of samples, so the macro's interval is conditional on drawing them and its per-class value
# moves by 1/k with one sample
RARE_CLASS_COUNT = 5


def rare_classes(y: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """{class: {"positives", "negatives"}} of the classes with fewer than RARE_CLASS_COUNT of either in `y`
    (the test truth, (n, C) or (n,)), in label order; a class without one of them is listed too (its AUC is
    undefined and left out of the macro)."""
    y = np.asarray(y, dtype=float)
    y = y[:, None] if y.ndim == 1 else y
    if y.shape[1] != len(labels):
        raise ValueError(f"{len(labels)} labels for {y.shape[1]} label columns")
    positives = (y > 0.5).sum(axis=0)
    return {str(label): {"positives": int(p), "negatives": int(len(y) - p)}
            for label, p in zip(labels, positives) if min(p, len(y) - p) < RARE_CLASS_COUNT}


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
    """(values - mean) / sqrt(k (k - 1)): squared and summed, the variance of the mean of k >= 2 values (ddof=1)."""
    k = len(values)
    return (values - mean) / np.sqrt(k * (k - 1))


# DeLong's variance of a class's AUC holds the sample variances (ddof=1) of both groups' structural
# components: with fewer than two positives or negatives it is not estimable (pROC gives NaN; treating a group
# of one as of zero variance, as a plain formula does, understates it)
DELONG_MIN_PER_GROUP = 2


def _z_test(delta: float, se: float) -> tuple[float, float, str]:
    """(z, two-sided p, why p is NaN or "")."""
    if se > 0:
        z = delta / se
        return float(z), float(2 * norm.sf(abs(z))), ""
    if delta == 0:  # the models order every (positive, negative) pair alike: nothing to test
        return 0.0, 1.0, ""
    return float("nan"), float("nan"), "a difference without estimable variance"


def delong(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
           labels: Sequence[str] | None = None) -> dict:
    """DeLong's test for the difference in (macro) ROC AUC of two models scored on the same samples.

    y, scores_a, scores_b: (n, C) or (n,); for a multi-class task pass the one-hot y (one-vs-rest per
    class). Per class this is DeLong et al. (1988): var(diff) = S_aa + S_bb - 2 S_ab with S = S10 / m + S01 / n
    (as pROC). A class with fewer than DELONG_MIN_PER_GROUP positives or negatives has no estimable variance:
    its se, z and p are NaN, it is listed in "untested" with the reason, and it is left out of the macro test,
    whose delta (and auc_a, auc_b) is then the mean over the tested classes only, which a caller must show as
    the difference it tested. The macro variance sums each sample's squared influence on the mean of the tested
    classes' differences: on class c's difference a positive has influence (dV10_i - dAUC_c) / sqrt(m_c (m_c - 1)),
    a negative (dV01_i - dAUC_c) / sqrt(n_c (n_c - 1)), and a sample's influence on the macro is their mean.
    Returns {"delta", "se", "z", "p", "auc_a", "auc_b", "tested", "untested", "per_class", "reason"}: "tested"
    lists the tested classes, "untested" maps each other class to why, "per_class" maps every class to its own
    {"auc_a", "auc_b", "delta", "se", "z", "p"}, and "reason" says why p is NaN ("" otherwise). Classes are
    named by `labels`, else by their column index. Two-sided normal p.
    """
    y, a = task_arrays("multi-label", y, scores_a)
    _, b = task_arrays("multi-label", y, scores_b)
    names = list(range(y.shape[1])) if labels is None else list(labels)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} labels for {y.shape[1]} label columns")
    nan = float("nan")
    influence = np.zeros(len(y))
    tested, untested, per_class, aucs = [], {}, {}, []
    for c, name in enumerate(names):
        positive = y[:, c] > 0.5
        m, n = int(positive.sum()), int((~positive).sum())
        if not (m and n):
            untested[name] = f"{m} positive(s), {n} negative(s): AUC undefined"
            per_class[name] = {"auc_a": nan, "auc_b": nan, "delta": nan, "se": nan, "z": nan, "p": nan}
            continue
        v10, v01 = _structural_components(positive, np.stack([a[:, c], b[:, c]]))
        auc = v10.mean(axis=1)
        difference = float(auc[0] - auc[1])
        result = {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "delta": difference, "se": nan, "z": nan, "p": nan}
        per_class[name] = result
        if min(m, n) < DELONG_MIN_PER_GROUP:
            untested[name] = (f"{m} positive(s), {n} negative(s): DeLong needs at least {DELONG_MIN_PER_GROUP} "
                              f"of each")
            continue
        own = np.zeros(len(y))
        own[positive] = _scaled_deviation(v10[0] - v10[1], difference)
        own[~positive] = _scaled_deviation(v01[0] - v01[1], difference)
        result["se"] = float(np.sqrt(np.sum(own**2)))
        result["z"], result["p"], _ = _z_test(difference, result["se"])
        influence += own
        tested.append(name)
        aucs.append(auc)
    out = {"tested": tested, "untested": untested, "per_class": per_class}
    if not tested:
        reason = (f"no class has at least {DELONG_MIN_PER_GROUP} positives and {DELONG_MIN_PER_GROUP} negatives"
                  if untested else "no class")
        return {"delta": nan, "se": nan, "z": nan, "p": nan, "auc_a": nan, "auc_b": nan, **out, "reason": reason}
    auc_a, auc_b = np.mean(aucs, axis=0)
    delta = float(auc_a - auc_b)
    se = float(np.sqrt(np.sum((influence / len(tested))**2)))
    z, p, reason = _z_test(delta, se)
    return {"delta": delta, "se": se, "z": z, "p": p, "auc_a": float(auc_a), "auc_b": float(auc_b), **out,
            "reason": reason}


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
