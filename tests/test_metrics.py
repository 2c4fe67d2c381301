import inspect

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from bench.evaluation.metrics import METRICS, choose_thresholds, task_metrics


def _multi_label(seed: int, n: int = 300, classes: int = 4, shift: float = 0.0):
    """Labels and informative, rounded (so tied) scores; `shift` moves every score."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < np.linspace(0.1, 0.5, classes)).astype(float)
    s = np.round(y * 0.6 + rng.random((n, classes)) + shift, 2)
    return y, s


def _multi_class(seed: int, n: int = 300, classes: int = 4):
    """One-hot labels; class 0 is never the arg-max (its F1 is 0), class 3 is rare."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(classes, n, p=[0.3, 0.3, 0.35, 0.05])
    y = np.eye(classes)[truth]
    s = np.round(y * 0.8 + rng.random((n, classes)), 1)
    s[:, 0] -= 5.0
    return y, s


def test_auc_matches_scikit_learn_per_class_and_macro():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 4)).astype(float)
    s = y * 0.5 + rng.random((200, 4))
    overall, per_class = task_metrics("multi-label", y, s, list("abcd"))
    assert np.allclose(list(per_class["auc"].values()), roc_auc_score(y, s, average=None))
    assert overall["auc"] == pytest.approx(roc_auc_score(y, s, average="macro"))


def test_a_class_with_one_label_value_is_nan_and_left_out_of_the_macro():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], float)
    s = np.array([[0.1, 0.3], [0.9, 0.2], [0.2, 0.5], [0.8, 0.1]])
    metrics, per_class = task_metrics("multi-label", y, s, ["a", "b"])
    assert metrics["auc"] == 1.0 and per_class["auc"]["a"] == 1.0 and np.isnan(per_class["auc"]["b"])
    all_undefined, _ = task_metrics("binary", y[:, 1:], s[:, 1:], ["b"])
    assert np.isnan(all_undefined["auc"])


@pytest.mark.parametrize("kind, classes", [("binary", 1), ("multi-label", 4)])
def test_thresholded_metrics_equal_scikit_learn_per_class_and_macro(kind, classes):
    y_val, s_val = _multi_label(1, classes=classes)
    y, s = _multi_label(2, classes=classes)
    thresholds = choose_thresholds(y_val, s_val)
    labels = list("abcd")[:classes]
    metrics, per_class = task_metrics(kind, y, s, labels, thresholds)
    assert list(metrics) == list(METRICS[kind]) and list(per_class) == ["auc", "f1", "acc", "mcc"]
    predicted = s >= thresholds
    want = {"auc": [roc_auc_score(y[:, c], s[:, c]) for c in range(classes)],
            "f1": [f1_score(y[:, c], predicted[:, c], zero_division=0) for c in range(classes)],
            "acc": [accuracy_score(y[:, c], predicted[:, c]) for c in range(classes)],
            "mcc": [matthews_corrcoef(y[:, c], predicted[:, c]) for c in range(classes)]}
    for name, values in want.items():
        assert [per_class[name][label] for label in labels] == pytest.approx(values, abs=1e-12)
        assert metrics[name] == pytest.approx(np.mean(values), abs=1e-12)
        assert type(metrics[name]) is float
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)


def test_a_class_predicted_negative_everywhere_scores_like_scikit_learn():
    y, s = _multi_label(3, classes=2)
    thresholds = np.array([s[:, 0].max() + 1, s[:, 1].min() - 1])  # nothing positive / everything positive
    _, per_class = task_metrics("multi-label", y, s, ["a", "b"], thresholds)
    for c, label in enumerate("ab"):
        predicted = s[:, c] >= thresholds[c]
        assert per_class["f1"][label] == f1_score(y[:, c], predicted, zero_division=0)
        assert per_class["mcc"][label] == matthews_corrcoef(y[:, c], predicted) == 0.0
        assert per_class["acc"][label] == pytest.approx(accuracy_score(y[:, c], predicted))


def test_multi_class_metrics_equal_scikit_learn():
    y, s = _multi_class(4)
    labels = ["n", "p", "c", "r"]
    metrics, per_class = task_metrics("multi-class", y, s, labels, thresholds=np.zeros(4))  # ignored
    assert list(metrics) == ["auc", "acc", "f1", "mcc"] and list(per_class) == ["auc", "f1"]
    truth, predicted = y.argmax(1), s.argmax(1)
    assert 0 not in predicted  # so that the macro F1 has a class without predictions
    assert metrics["acc"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(truth, predicted, average="macro", labels=range(4),
                                                   zero_division=0), abs=1e-12)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(truth, predicted), abs=1e-12)
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
    per_class_f1 = f1_score(truth, predicted, average=None, labels=range(4), zero_division=0)
    assert [per_class["f1"][label] for label in labels] == pytest.approx(per_class_f1, abs=1e-12)
    assert [per_class["auc"][label] for label in labels] == pytest.approx(roc_auc_score(y, s, average=None))


def test_without_thresholds_binary_and_multi_label_tasks_report_auc_only():
    y, s = _multi_label(5)
    metrics, per_class = task_metrics("multi-label", y, s, list("abcd"))
    assert list(metrics) == ["auc"] and list(per_class) == ["auc"]


def test_inputs_that_do_not_fit_the_task_kind_are_refused():
    y, s = _multi_class(6)
    with pytest.raises(ValueError, match="unknown task kind"):
        task_metrics("multiclass", y, s, list("abcd"))
    with pytest.raises(ValueError, match="one positive label"):
        task_metrics("multi-class", np.ones_like(y), s, list("abcd"))
    with pytest.raises(ValueError, match="one label column"):
        task_metrics("binary", y, s, list("abcd"))
    with pytest.raises(ValueError, match="one threshold per class"):
        task_metrics("multi-label", y, s, list("abcd"), np.zeros(3))


def _f1_at(y: np.ndarray, s: np.ndarray, threshold: float) -> float:
    return f1_score(y, s >= threshold, zero_division=0)


@pytest.mark.parametrize("seed", range(5))
def test_choose_thresholds_maximises_validation_f1(seed):
    y, s = _multi_label(seed, n=120, classes=3)
    thresholds = choose_thresholds(y, s)
    assert thresholds.shape == (3,) and np.isfinite(thresholds).all()
    for c in range(3):
        # every distinct val prediction: "positive from this score up", and "nothing positive"
        candidates = [*np.unique(s[:, c]), np.inf]
        best = max(_f1_at(y[:, c], s[:, c], t) for t in candidates)
        assert _f1_at(y[:, c], s[:, c], thresholds[c]) == pytest.approx(best, abs=1e-12)
        assert thresholds[c] not in s[:, c]


def test_equal_f1_goes_to_the_highest_threshold_midway_below_the_chosen_score():
    # from the top: F1 2/3 at >= 0.9, 1/2, 2/5, then 2/3 again at >= 0.3, 4/7
    y = np.array([1, 0, 0, 1, 0], float)
    s = np.array([0.9, 0.7, 0.5, 0.3, 0.1])
    assert choose_thresholds(y, s) == pytest.approx([0.8])
    assert choose_thresholds(np.array([0, 1, 0, 1.0]), np.array([0.1, 0.4, 0.6, 0.9])) == pytest.approx([0.25])


def test_thresholds_at_the_ends_of_the_validation_scores():
    s = np.array([[0.2, 0.2], [0.4, 0.4], [0.8, 0.8]])
    y = np.array([[0, 1], [0, 1], [0, 1]], float)
    # no positive: every threshold gives F1 0, the highest predicts negative; all positive: predict positive
    assert choose_thresholds(y, s) == pytest.approx([1.0, 0.1])
    assert choose_thresholds(np.ones((2, 1)), np.full((2, 1), 0.3)) == pytest.approx([-0.2])


def test_thresholds_come_from_validation_only():
    assert list(inspect.signature(choose_thresholds).parameters) == ["y_val", "scores_val"]
    y_val, s_val = _multi_label(7, n=400, classes=3)
    y, s = _multi_label(8, n=400, classes=3, shift=0.3)  # the test scores drift upwards
    thresholds = choose_thresholds(y_val, s_val)
    kept = thresholds.copy()
    metrics, per_class = task_metrics("multi-label", y, s, list("abc"), thresholds)
    # tuned on test, F1 would be higher: the reported one is the F1 at the val thresholds
    tuned_on_test = choose_thresholds(y, s)
    assert not np.allclose(tuned_on_test, thresholds)
    for c, label in enumerate("abc"):
        assert per_class["f1"][label] == pytest.approx(_f1_at(y[:, c], s[:, c], thresholds[c]))
    oracle = np.mean([_f1_at(y[:, c], s[:, c], tuned_on_test[c]) for c in range(3)])
    assert metrics["f1"] < oracle - 0.01
    # flipped or permuted test labels change the test metrics, never the thresholds they are taken at
    rng = np.random.default_rng(0)
    for y_other in (1 - y, y[rng.permutation(len(y))]):
        _, other = task_metrics("multi-label", y_other, s, list("abc"), thresholds)
        for c, label in enumerate("abc"):
            assert other["f1"][label] == pytest.approx(_f1_at(y_other[:, c], s[:, c], kept[c]))
    assert np.array_equal(thresholds, kept)
