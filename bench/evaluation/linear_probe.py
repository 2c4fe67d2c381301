"""Linear probe: frozen image features and logistic regression fitted on a label fraction of train (its
frozen id list), C chosen on the val split by the task's metric, reported on the test split. Multi-label
and binary tasks fit one regression per class; multi-class tasks one multinomial regression."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bench.errors import UserError
from bench.evaluation.features import image_outputs, predictions_frame
from bench.method import Method
from bench.metrics import task_metrics


def _fit_predict(x_train, y_train, x_eval, c: float, max_iter: int, seed: int, multiclass: bool) -> np.ndarray:
    def fit(y: np.ndarray) -> LogisticRegression:
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x_train, y)

    scores = np.zeros((len(x_eval), y_train.shape[1]))
    if multiclass:
        clf = fit(y_train.argmax(1))
        scores[:, clf.classes_] = clf.predict_proba(x_eval)
        return scores
    for j in range(y_train.shape[1]):
        if len(np.unique(y_train[:, j])) < 2:  # a class absent from train: no information, constant score
            scores[:, j] = y_train[0, j]
            continue
        scores[:, j] = fit(y_train[:, j]).predict_proba(x_eval)[:, 1]
    return scores


def linear_probe(method: Method, data, cfg, device: torch.device, num_workers: int = 0) -> dict:
    lp, task = cfg.eval.linear_probe, data.task
    parts = {"train": data.rows("train", float(lp.fraction)), "val": data.rows("val"),
             "test": data.rows("test")}
    for split, rows in parts.items():
        if rows.empty:
            raise UserError(f"linear probe: the {split} split of {data.name} is empty")
    multiclass = not task.multilabel and len(task.labels) > 1
    y = {s: rows[task.labels].to_numpy(dtype=float) for s, rows in parts.items()}
    if multiclass and not (y["train"].sum(1) == 1).all():
        raise UserError(f"linear probe: {data.name}'s train split is not single-label, so it cannot train "
                        f"its multi-class task (evaluate it zero-shot)")
    feats = {s: image_outputs(method, rows, method.encode_image, data.preprocessor(augment=False), data.cache,
                              cfg.eval.batch_size, device, num_workers) for s, rows in parts.items()}
    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    fit = dict(max_iter=int(lp.max_iter), seed=int(cfg.eval.seed), multiclass=multiclass)
    val_metric = {}
    for c in lp.c_grid:
        val_scores = _fit_predict(x["train"], y["train"], x["val"], float(c), **fit)
        val_metric[float(c)] = task_metrics(multiclass, y["val"], val_scores, task.labels)[0][task.metric]
    best_c = max(val_metric, key=lambda c: (np.nan_to_num(val_metric[c], nan=-1.0), -c))
    scores = _fit_predict(x["train"], y["train"], x["test"], best_c, **fit)
    metrics, per_class = task_metrics(multiclass, y["test"], scores, task.labels)
    return {"metrics": metrics, "per_class": per_class, "n_test": len(parts["test"]),
            "predictions": predictions_frame(parts["test"], task, y["test"], scores),
            "chosen": {"C": best_c, f"val_{task.metric}_by_C": val_metric, "n_train": len(parts["train"])}}
