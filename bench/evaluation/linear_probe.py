"""Linear probe: frozen image features, one logistic regression per class (one-vs-rest for multi-label),
C chosen on the val split by macro AUC, reported on the test split."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bench.datasets.base import Task
from bench.errors import UserError
from bench.evaluation.features import eval_preprocessor, image_outputs, predictions_frame
from bench.method import Method
from bench.metrics import auc_per_class, macro


def _subset(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    if fraction >= 1.0:
        return rows
    return rows.sample(frac=fraction, random_state=seed).sort_index()


def _fit_predict(x_train, y_train, x_eval, c: float, max_iter: int, seed: int) -> np.ndarray:
    scores = np.zeros((len(x_eval), y_train.shape[1]))
    for j in range(y_train.shape[1]):
        if len(np.unique(y_train[:, j])) < 2:  # a class absent from train: no information, constant score
            scores[:, j] = y_train[0, j]
            continue
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train[:, j])
        scores[:, j] = clf.predict_proba(x_eval)[:, 1]
    return scores


def linear_probe(method: Method, manifest: pd.DataFrame, task: Task, cfg, device: torch.device,
                 num_workers: int = 0) -> dict:
    lp = cfg.eval.linear_probe
    parts = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    parts["train"] = _subset(parts["train"], float(lp.fraction), int(cfg.eval.seed))
    for split, rows in parts.items():
        if rows.empty:
            raise UserError(f"linear probe: the {split} split of this dataset is empty")
    feats = {s: image_outputs(method, rows, method.encode_image, eval_preprocessor(cfg), cfg.eval.batch_size,
                              device, num_workers) for s, rows in parts.items()}
    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    y = {s: rows[task.labels].to_numpy(dtype=float) for s, rows in parts.items()}
    val_auc = {}
    for c in lp.c_grid:
        val_scores = _fit_predict(x["train"], y["train"], x["val"], float(c), int(lp.max_iter), int(cfg.eval.seed))
        val_auc[float(c)] = macro(auc_per_class(y["val"], val_scores, task.labels))
    best_c = max(val_auc, key=lambda c: (np.nan_to_num(val_auc[c], nan=-1.0), -c))
    scores = _fit_predict(x["train"], y["train"], x["test"], best_c, int(lp.max_iter), int(cfg.eval.seed))
    per_class = auc_per_class(y["test"], scores, task.labels)
    return {"metrics": {"auc": macro(per_class)}, "per_class": {"auc": per_class},
            "predictions": predictions_frame(parts["test"], task, y["test"], scores), "n_test": len(parts["test"]),
            "chosen": {"C": best_c, "val_auc_by_C": val_auc, "n_train": len(parts["train"])}}
