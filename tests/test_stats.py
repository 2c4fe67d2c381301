import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from bench.evaluation import stats
from bench.evaluation.metrics import choose_thresholds, task_metrics
from bench.evaluation.stats import (bootstrap, combined_ci, delong, holm, paired_bootstrap, percentile_ci,
                                    resample_indices, significance_marker)


def _multi_label(seed: int, n: int = 200, classes: int = 3, signal: float = 0.6):
    """Labels and rounded (so tied) scores; the rarest class has few positives, so that some resamples
    lack them."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < np.linspace(0.04, 0.5, classes)).astype(float)
    return y, np.round(y * signal + rng.random((n, classes)), 1)


def _multi_class(seed: int, n: int = 200, classes: int = 3):
    rng = np.random.default_rng(seed)
    y = np.eye(classes)[rng.integers(0, classes, n)]
    return y, np.round(y * 0.5 + rng.random((n, classes)), 1)


def _sklearn_macro(kind: str, y: np.ndarray, s: np.ndarray, thresholds: np.ndarray | None) -> dict[str, float]:
    """The macro metrics, by scikit-learn, written out independently of bench.evaluation.metrics."""
    defined = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    out = {"auc": np.mean([roc_auc_score(y[:, c], s[:, c]) for c in defined]) if defined else np.nan}
    if kind == "multi-class":
        truth, predicted = y.argmax(1), s.argmax(1)
        out["acc"] = accuracy_score(truth, predicted)
        out["f1"] = f1_score(truth, predicted, average="macro", labels=range(y.shape[1]), zero_division=0)
        out["mcc"] = matthews_corrcoef(truth, predicted)
    elif thresholds is not None:
        predicted = s >= thresholds
        columns = range(y.shape[1])
        out["f1"] = np.mean([f1_score(y[:, c], predicted[:, c], zero_division=0) for c in columns])
        out["acc"] = np.mean([accuracy_score(y[:, c], predicted[:, c]) for c in columns])
        out["mcc"] = np.mean([matthews_corrcoef(y[:, c], predicted[:, c]) for c in columns])
    return out


def test_resample_indices_depend_on_n_resample_and_seed_only():
    first = resample_indices(50, 3, seed=1)
    assert first.shape == (50,) and first.min() >= 0 and first.max() < 50
    assert np.array_equal(first, resample_indices(50, 3, seed=1))
    assert not np.array_equal(first, resample_indices(50, 4, seed=1))
    assert not np.array_equal(first, resample_indices(50, 3, seed=2))


@pytest.mark.parametrize("kind", ["multi-label", "multi-class"])
def test_a_replicate_equals_scikit_learn_on_the_explicitly_resampled_data(kind):
    if kind == "multi-label":
        y_val, s_val = _multi_label(0)
        y, s = _multi_label(1)
        thresholds = choose_thresholds(y_val, s_val)
    else:
        (y, s), thresholds = _multi_class(1), None
    out = bootstrap(kind, y, s, thresholds, resamples=60, seed=3)
    assert set(out["replicates"]) == set(task_metrics(kind, y, s, ["a", "b", "c"], thresholds)[0])
    for b in (0, 17, 59):
        rows = resample_indices(len(y), b, seed=3)
        want = _sklearn_macro(kind, y[rows], s[rows], thresholds)
        for name, value in want.items():
            assert out["replicates"][name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, b)


def test_a_resample_without_positives_of_a_point_estimate_class_has_no_macro_auc():
    y = np.zeros((30, 2))
    y[10, 0] = 1.0  # class 0 has one positive, so about a third of the resamples miss it
    y[:15, 1] = 1.0
    s = np.linspace(0, 1, 30)[:, None] * np.array([-1.0, -1.0])  # class 1 perfectly separated
    out = bootstrap("multi-label", y, s, None, resamples=200)
    want = np.full(200, np.nan)
    for b in range(200):
        rows = resample_indices(30, b)
        if 10 in rows:  # every replicate averages both classes, as the point estimate does, or is NaN
            want[b] = (roc_auc_score(y[rows, 0], s[rows, 0]) + 1) / 2
    assert np.isnan(want).sum() > 40
    np.testing.assert_allclose(out["replicates"]["auc"], want, rtol=0, atol=1e-12)
    # the interval is the percentile interval of the replicates that keep every class, restricted by hand
    assert out["ci"]["auc"] == pytest.approx(list(np.percentile(want[np.isfinite(want)], [2.5, 97.5])))
    lonely = bootstrap("binary", np.zeros((20, 1)), np.ones((20, 1)), None, resamples=10)
    assert np.isnan(lonely["replicates"]["auc"]).all() and np.isnan(lonely["ci"]["auc"]).all()


def test_a_class_absent_from_the_test_split_stays_out_of_every_replicate():
    y, s = _multi_label(20, n=120)
    y[:, 0] = 0.0  # undefined in the point estimate: neither it nor any replicate averages it
    out = bootstrap("multi-label", y, s, None, resamples=30, seed=2)
    for b in (0, 11, 29):
        rows = resample_indices(len(y), b, seed=2)
        want = np.mean([roc_auc_score(y[rows, c], s[rows, c]) for c in (1, 2)])
        assert out["replicates"]["auc"][b] == pytest.approx(want, abs=1e-12)


def test_macro_nan_replicates_depend_on_the_truth_only_so_paired_differences_stay_paired():
    rng = np.random.default_rng(21)
    y = (rng.random((80, 3)) < [0.0, 0.2, 0.5]).astype(float)
    y[:2, 0] = 1.0  # a class of two positives: many resamples lose it
    first, second = rng.random((80, 3)), y + rng.random((80, 3))
    a = bootstrap("multi-label", y, first, None, resamples=100, seed=1)["replicates"]["auc"]
    b = bootstrap("multi-label", y, second, None, resamples=100, seed=1)["replicates"]["auc"]
    assert 0 < np.isnan(a).sum() < 100 and np.array_equal(np.isnan(a), np.isnan(b))
    res = paired_bootstrap([a], [b], seed=0)
    assert res["ci"] == pytest.approx(list(np.percentile((a - b)[np.isfinite(a)], [2.5, 97.5])))


def test_rare_classes_are_those_with_few_positives_or_negatives():
    y = np.zeros((50, 4))
    y[:2, 0] = 1.0  # 2 positives
    y[:20, 1] = 1.0
    y[:47, 2] = 1.0  # 3 negatives
    assert stats.rare_classes(y, ["a", "b", "c", "d"]) == {
        "a": {"positives": 2, "negatives": 48}, "c": {"positives": 47, "negatives": 3},
        "d": {"positives": 0, "negatives": 50}}
    y[:stats.RARE_CLASS_COUNT, 0] = 1.0
    assert "a" not in stats.rare_classes(y, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="2 labels for 4 label columns"):
        stats.rare_classes(y, ["a", "b"])


def test_resamples_are_evaluated_in_chunks_without_changing_them(monkeypatch):
    y, s = _multi_label(2)
    thresholds = np.full(3, 0.6)
    whole = bootstrap("multi-label", y, s, thresholds, resamples=25, seed=4)
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 7 * len(y))  # chunks of 7 resamples
    chunked = bootstrap("multi-label", y, s, thresholds, resamples=25, seed=4)
    for name in whole["replicates"]:
        assert np.array_equal(whole["replicates"][name], chunked["replicates"][name], equal_nan=True)


def test_a_perfect_classifier_has_the_interval_one_one():
    rng = np.random.default_rng(5)
    y = (rng.random((400, 3)) < 0.3).astype(float)
    s = y + rng.random((400, 3)) * 0.9
    thresholds = choose_thresholds(y[:200], s[:200])
    out = bootstrap("multi-label", y[200:], s[200:], thresholds, resamples=200)
    assert set(out["ci"]) == {"auc", "f1", "acc", "mcc"}
    for name, interval in out["ci"].items():
        assert interval == [1.0, 1.0], name
    y_mc = np.eye(3)[rng.integers(0, 3, 300)]
    out = bootstrap("multi-class", y_mc, y_mc + rng.random((300, 3)) * 0.9, None, resamples=200)
    assert out["ci"] == {name: [1.0, 1.0] for name in ("auc", "acc", "f1", "mcc")}


def test_the_auc_interval_of_a_random_classifier_covers_one_half():
    rng = np.random.default_rng(6)
    y = (rng.random(2000) < 0.3).astype(float)
    s = rng.random(2000)
    out = bootstrap("binary", y, s, None, resamples=500, seed=1)
    lo, hi = out["ci"]["auc"]
    assert lo < 0.5 < hi and hi - lo < 0.08
    assert lo < task_metrics("binary", y, s, ["x"])[0]["auc"] < hi
    assert out["resamples"] == 500 and out["seed"] == 1 and out["confidence"] == 0.95


def test_replicates_of_two_models_on_one_test_set_are_paired():
    y, s = _multi_label(7)
    s_other = np.round(s + np.random.default_rng(8).normal(0, 0.3, s.shape), 1)
    a = bootstrap("multi-label", y, s, None, resamples=40, seed=9)
    b = bootstrap("multi-label", y, s_other, None, resamples=40, seed=9)
    for r in (0, 21, 39):
        rows = resample_indices(len(y), r, seed=9)
        want = _sklearn_macro("multi-label", y[rows], s[rows], None)["auc"] - \
            _sklearn_macro("multi-label", y[rows], s_other[rows], None)["auc"]
        assert a["replicates"]["auc"][r] - b["replicates"]["auc"][r] == pytest.approx(want, abs=1e-12)
    again = bootstrap("multi-label", y, s, None, resamples=40, seed=9)
    assert np.array_equal(a["replicates"]["auc"], again["replicates"]["auc"]) and a["ci"] == again["ci"]
    other_seed = bootstrap("multi-label", y, s, None, resamples=40, seed=10)
    assert not np.array_equal(a["replicates"]["auc"], other_seed["replicates"]["auc"])


def test_combined_interval_reduces_to_one_record_and_widens_with_seed_spread():
    y, s = _multi_label(11, n=500)
    replicates = bootstrap("multi-label", y, s, None, resamples=400)["replicates"]["auc"]
    single = percentile_ci(replicates)
    assert combined_ci([replicates]) == tuple(single)
    assert combined_ci([replicates, replicates.copy(), replicates.copy()], seed=3) == tuple(single)
    spread = [replicates - 0.05, replicates, replicates + 0.05]
    lo, hi = combined_ci(spread)
    assert hi - lo > single[1] - single[0] + 0.03
    assert lo < single[0] and hi > single[1]


def test_paired_bootstrap_and_delong_find_a_real_difference():
    rng = np.random.default_rng(12)
    n = 600
    y = (rng.random(n) < 0.5).astype(float)
    strong, weak = y * 1.5 + rng.normal(size=n), y * 0.7 + rng.normal(size=n)
    true_difference = norm.cdf(1.5 / np.sqrt(2)) - norm.cdf(0.7 / np.sqrt(2))  # binormal AUCs
    point_difference = roc_auc_score(y, strong) - roc_auc_score(y, weak)

    test = delong(y, strong, weak)
    assert test["delta"] == pytest.approx(point_difference, abs=1e-12)
    assert test["auc_a"] == pytest.approx(roc_auc_score(y, strong), abs=1e-12)
    assert test["p"] < 0.01 and abs(test["delta"] - true_difference) < 0.06

    a = bootstrap("binary", y, strong, None, resamples=1000)["replicates"]["auc"]
    b = bootstrap("binary", y, weak, None, resamples=1000)["replicates"]["auc"]
    paired = paired_bootstrap([a], [b], point_a=[roc_auc_score(y, strong)], point_b=[roc_auc_score(y, weak)])
    assert paired["delta"] == pytest.approx(point_difference)
    assert paired["p"] < 0.01 and paired["ci"][0] > 0 and paired["ci"][0] < true_difference < paired["ci"][1]
    assert paired["p"] >= 2 / 1001  # never exactly 0
    # the two tests agree on the spread of the difference, too
    assert (paired["ci"][1] - paired["ci"][0]) / (2 * norm.ppf(0.975)) == pytest.approx(test["se"], rel=0.2)


def test_paired_bootstrap_and_delong_find_no_difference_between_equal_models():
    rng = np.random.default_rng(13)
    n = 600
    y = (rng.random(n) < 0.5).astype(float)
    first, second = y + rng.normal(size=n), y + rng.normal(size=n)
    assert delong(y, first, second)["p"] > 0.05
    a = bootstrap("binary", y, first, None, resamples=1000)["replicates"]["auc"]
    b = bootstrap("binary", y, second, None, resamples=1000)["replicates"]["auc"]
    paired = paired_bootstrap([a], [b])
    assert paired["p"] > 0.05 and paired["ci"][0] < 0 < paired["ci"][1]
    assert paired["delta"] == pytest.approx(np.mean(a - b))


def test_paired_bootstrap_resamples_seeds_on_each_side():
    base = np.random.default_rng(14).normal(0.8, 0.01, 300)
    a = [base + 0.02, base + 0.03, base + 0.01]
    b = [base, base + 0.001]
    out = paired_bootstrap(a, b, seed=1, point_a=[0.82, 0.83, 0.81], point_b=[0.8, 0.801])
    assert out["delta"] == pytest.approx(0.82 - 0.8005)
    # the shared test resample cancels: only the seed picks move the difference, within [0.009, 0.03]
    assert 0.009 <= out["ci"][0] < out["ci"][0] + 0.005 < out["ci"][1] <= 0.03
    assert out["p"] == pytest.approx(2 / 301)
    assert paired_bootstrap(a, b, seed=1) == paired_bootstrap(a, b, seed=1)
    with pytest.raises(ValueError, match="share"):
        paired_bootstrap([base], [base[:10]])


def _delong_reference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. (1988) written out with explicit pairwise comparisons: (delta, se, p)."""
    positive, negative = y == 1, y == 0
    components = []
    for scores in (a, b):
        x, z = scores[positive][:, None], scores[negative][None, :]
        psi = (x > z) + 0.5 * (x == z)  # [positive, negative]
        components.append((psi.mean(axis=1), psi.mean(axis=0)))
    v10 = np.stack([c[0] for c in components])
    v01 = np.stack([c[1] for c in components])
    covariance = np.cov(v10) / positive.sum() + np.cov(v01) / negative.sum()
    delta = v10[0].mean() - v10[1].mean()
    se = np.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    return delta, se, 2 * norm.sf(abs(delta / se))


@pytest.mark.parametrize("seed", [15, 16])
def test_delong_for_one_class_equals_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(150) < 0.3).astype(float)
    a = np.round(y + rng.normal(size=150), 1)  # ties within and across the classes
    b = np.round(0.5 * y + rng.normal(size=150), 1)
    delta, se, p = _delong_reference(y, a, b)
    got = delong(y, a, b)
    assert got["delta"] == pytest.approx(delta, abs=1e-12)
    assert got["se"] == pytest.approx(se, rel=1e-9)
    assert got["p"] == pytest.approx(p, rel=1e-7)
    assert got["z"] == pytest.approx(delta / se, rel=1e-9)
    assert delong(y[:, None], a[:, None], b[:, None]) == got


def test_delong_over_several_classes_tests_the_macro_auc_difference():
    y, a = _multi_class(17, n=300)
    b = np.round(a + np.random.default_rng(18).normal(0, 0.4, a.shape), 1)
    got = delong(y, a, b)
    assert got["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert got["auc_b"] == pytest.approx(roc_auc_score(y, b, average="macro"), abs=1e-12)
    # a class repeated C times is still one test: the macro influence of each sample is unchanged
    one = delong(y[:, 0], a[:, 0], b[:, 0])
    repeated = delong(np.repeat(y[:, :1], 3, axis=1), np.repeat(a[:, :1], 3, axis=1), np.repeat(b[:, :1], 3, axis=1))
    assert repeated["se"] == pytest.approx(one["se"]) and repeated["p"] == pytest.approx(one["p"])
    # the variance sums each sample's influence on the macro difference, written out pairwise here
    influence = np.zeros(len(y))
    for c in range(3):
        positive = y[:, c] == 1
        v10, v01 = [], []
        for scores in (a[:, c], b[:, c]):
            x, z = scores[positive][:, None], scores[~positive][None, :]
            psi = (x > z) + 0.5 * (x == z)
            v10.append(psi.mean(axis=1))
            v01.append(psi.mean(axis=0))
        d10, d01 = v10[0] - v10[1], v01[0] - v01[1]
        m, k = len(d10), len(d01)
        influence[positive] += (d10 - d10.mean()) / np.sqrt(m * (m - 1)) / 3
        influence[~positive] += (d01 - d01.mean()) / np.sqrt(k * (k - 1)) / 3
    assert got["se"] == pytest.approx(np.sqrt(np.sum(influence**2)), rel=1e-9)
    assert got["p"] == pytest.approx(2 * norm.sf(abs(got["delta"]) / got["se"]))


def test_delong_of_identical_models_and_of_undefined_auc():
    y, s = _multi_label(19, n=100)
    same = delong(y, s, s)
    assert same["delta"] == 0 and same["p"] == 1.0 and same["reason"] == ""
    undefined = delong(np.zeros(10), np.arange(10.0), np.arange(10.0))
    assert np.isnan(undefined["p"]) and np.isnan(undefined["delta"])
    assert undefined["untested"] == {0: "0 positive(s), 10 negative(s): AUC undefined"}
    assert undefined["reason"] == "no class has at least 2 positives and 2 negatives"


def test_delong_leaves_a_class_without_estimable_variance_out_and_says_why():
    rng = np.random.default_rng(22)
    y = (rng.random((150, 3)) < 0.3).astype(float)
    y[:, 1] = 0.0
    y[7, 1] = 1.0  # one positive: AUC defined, its variance not (pROC: NaN)
    a = np.round(y + rng.normal(size=y.shape), 1)
    b = np.round(0.5 * y + rng.normal(size=y.shape), 1)
    got = delong(y, a, b, labels=["x", "Hernia", "z"])
    assert got["tested"] == ["x", "z"]
    assert got["untested"] == {"Hernia": "1 positive(s), 149 negative(s): DeLong needs at least 2 of each"}
    hernia = got["per_class"]["Hernia"]
    assert np.isnan(hernia["se"]) and np.isnan(hernia["p"]) and np.isnan(hernia["z"])
    assert hernia["delta"] == pytest.approx(roc_auc_score(y[:, 1], a[:, 1]) - roc_auc_score(y[:, 1], b[:, 1]))
    for c, name in ((0, "x"), (2, "z")):  # a tested class is DeLong's one-class test, written out pairwise
        _, se, p = _delong_reference(y[:, c], a[:, c], b[:, c])
        assert got["per_class"][name]["se"] == pytest.approx(se, rel=1e-9)
        assert got["per_class"][name]["p"] == pytest.approx(p, rel=1e-7)
    # the macro test is that of the tested classes alone: delta, AUCs, se and p
    alone = delong(y[:, [0, 2]], a[:, [0, 2]], b[:, [0, 2]])
    for key in ("delta", "se", "z", "p", "auc_a", "auc_b"):
        assert got[key] == pytest.approx(alone[key], rel=1e-12), key
    everything_rare = delong(y[:, 1], a[:, 1], b[:, 1])
    assert np.isnan(everything_rare["p"]) and "at least 2 positives and 2 negatives" in everything_rare["reason"]


def test_holm_adjusts_in_input_order():
    # sorted: 0.01*4 = 0.04, 0.03*3 = 0.09, 0.04*2 = 0.08 -> 0.09 (kept monotone), 0.20*1
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    adjusted = holm([0.01, float("nan"), 0.04])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.5, 0.6, 0.01]) == pytest.approx([1.0, 1.0, 0.03])
    assert holm([]) == []
    rng = np.random.default_rng(20)
    raw = rng.random(12) ** 3
    adjusted = np.array(holm(raw))
    order = np.argsort(raw)
    assert (np.diff(adjusted[order]) >= 0).all() and (adjusted >= raw).all()


def test_significance_markers():
    assert [significance_marker(p) for p in (0.2, 0.05, 0.049, 0.01, 0.0099, 0.001, 0.0009, float("nan"))] == \
        ["", "", "*", "*", "**", "**", "***", ""]
