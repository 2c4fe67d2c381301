import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bench.evaluation import zero_shot
from bench.metrics import auc_per_class, macro
from bench.pipeline import build_method, load_dataset


def test_auc_matches_scikit_learn_per_class_and_macro():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 4)).astype(float)
    s = y * 0.5 + rng.random((200, 4))
    got = auc_per_class(y, s, list("abcd"))
    want = roc_auc_score(y, s, average=None)
    assert np.allclose(list(got.values()), want)
    assert macro(got) == pytest.approx(roc_auc_score(y, s, average="macro"))


def test_a_class_with_one_label_value_is_nan_and_left_out_of_the_macro():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], float)
    s = np.array([[0.1, 0.3], [0.9, 0.2], [0.2, 0.5], [0.8, 0.1]])
    per = auc_per_class(y, s, ["a", "b"])
    assert per["a"] == 1.0 and np.isnan(per["b"])
    assert macro(per) == 1.0


def test_zero_shot_is_computed_over_the_whole_split_independent_of_batch_size(tiny_cfg):
    cfg = tiny_cfg()
    method = build_method(cfg, 0)
    data = load_dataset(cfg, "chexpert")
    task = data.task
    results = []
    for bs in (7, 64):
        cfg.eval.batch_size = bs
        results.append(zero_shot(method, data, cfg, torch.device("cpu")))
    n_test = int((data.manifest["split"] == "test").sum())
    assert results[0]["n_test"] == n_test == len(results[0]["predictions"])
    assert results[0]["predictions"]["sample_id"].is_unique
    assert results[0]["metrics"]["auc"] == pytest.approx(results[1]["metrics"]["auc"], abs=1e-6)
    # the stored predictions are enough to recompute the metric
    preds = results[0]["predictions"]
    recomputed = macro(auc_per_class(preds[[f"true/{c}" for c in task.labels]].to_numpy(),
                                     preds[[f"score/{c}" for c in task.labels]].to_numpy(), task.labels))
    assert recomputed == pytest.approx(results[0]["metrics"]["auc"])


def test_multi_class_tasks_report_accuracy_from_stored_predictions(tiny_cfg):
    from bench.errors import UserError
    from bench.evaluation import linear_probe
    from bench.metrics import accuracy

    cfg = tiny_cfg(extra=("eval.linear_probe.c_grid=[1.0]",))
    method = build_method(cfg, 0)
    for dataset, protocol in (("covidx", zero_shot), ("chexpert-5x200", zero_shot), ("covidx", linear_probe)):
        data = load_dataset(cfg, dataset)
        out = protocol(method, data, cfg, torch.device("cpu"))
        preds = out["predictions"]
        y = preds[[f"true/{c}" for c in data.task.labels]].to_numpy()
        s = preds[[f"score/{c}" for c in data.task.labels]].to_numpy()
        assert (y.sum(1) == 1).all() and np.allclose(s.sum(1), 1.0)
        assert out["metrics"]["acc"] == pytest.approx(accuracy(y, s)) and "auc" in out["metrics"]
    with pytest.raises(UserError, match="not single-label"):
        linear_probe(method, load_dataset(cfg, "chexpert-5x200"), cfg, torch.device("cpu"))
