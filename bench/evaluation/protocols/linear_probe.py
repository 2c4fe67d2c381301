"""Linear probe: logistic regression on frozen image features of a label fraction of train (its frozen id
list), the regularisation C chosen on the val split by the task's metric, decision thresholds chosen on val,
reported on the test split. Binary and multi-label tasks fit one regression per class, multi-class tasks one
multinomial regression. Features come from the model's feature cache, so fractions and seeds cost a fit,
not an encoder pass."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from bench.core.checks import integer, list_of, number
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_protocol
from bench.evaluation.protocol import EvalContext, Protocol

if TYPE_CHECKING:
    from bench.evaluation.result import ProtocolResult

np = lazy_module("numpy")


@register_protocol("linear-probe")
class LinearProbe(Protocol):
    order = 1
    frozen = True
    fits_labels = True
    defaults = {
        "c_grid": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0],  # logistic-regression C, chosen on the val split
        "max_iter": 2000,
    }
    setting_checks = {"c_grid": list_of(number(0, low_open=True), nonempty=True), "max_iter": integer(1)}

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> ProtocolResult:
        return linear_probe(ctx, fraction, seed)


def _fit_predict(x_train, y_train, x_evals: list[np.ndarray], c: float, max_iter: int, seed: int,
                 multiclass: bool) -> list[np.ndarray]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def fit(y: np.ndarray) -> LogisticRegression:
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x_train, y)

    outs = [np.zeros((len(x), y_train.shape[1])) for x in x_evals]
    if multiclass:
        clf = fit(y_train.argmax(1))
        for out, x in zip(outs, x_evals):
            out[:, clf.classes_] = clf.predict_proba(x)
        return outs
    for j in range(y_train.shape[1]):
        if len(np.unique(y_train[:, j])) < 2:  # a class absent from train: no information, constant score
            for out in outs:
                out[:, j] = y_train[0, j]
            continue
        clf = fit(y_train[:, j])
        for out, x in zip(outs, x_evals):
            out[:, j] = clf.predict_proba(x)[:, 1]
    return outs


def linear_probe(ctx: EvalContext, fraction: float, seed: int) -> ProtocolResult:
    from sklearn.preprocessing import StandardScaler

    from bench.evaluation.metrics import task_metrics
    from bench.evaluation.result import ProtocolResult, split_labels, val_thresholds

    lp, task, data = ctx.cfg.eval.linear_probe, ctx.data.task, ctx.data
    parts, feats, report = {}, {}, ctx.report_split
    for split in dict.fromkeys(("train", "val", report)):
        parts[split], feats[split] = ctx.features.get(ctx.method, data, split)
    subset = ctx.train_rows(fraction, seed)
    index = {sid: i for i, sid in enumerate(parts["train"]["sample_id"])}
    missing = [sid for sid in subset["sample_id"] if sid not in index]
    if missing:
        raise UserError(f"linear probe: {len(missing)} sample(s) of {data.name}'s {fraction:g} train fraction are "
                        f"not in its train split (e.g. {missing[0]})")
    parts["train"] = subset
    feats["train"] = feats["train"][[index[sid] for sid in subset["sample_id"]]]
    y = split_labels(task, parts, "linear probe", data.name)
    multiclass = task.kind == "multi-class"
    started = time.perf_counter()
    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    fit = dict(max_iter=int(lp.max_iter), seed=int(seed), multiclass=multiclass)
    val_metric = {}
    for c in lp.c_grid:
        (val_scores,) = _fit_predict(x["train"], y["train"], [x["val"]], float(c), **fit)
        val_metric[float(c)] = task_metrics(task.kind, y["val"], val_scores, task.labels)[0][task.metric]
    best_c = max(val_metric, key=lambda c: (np.nan_to_num(val_metric[c], nan=-1.0), -c))
    val_scores, scores = _fit_predict(x["train"], y["train"], [x["val"], x[report]], best_c, **fit)
    chosen = {"C": best_c, f"val_{task.metric}_by_C": val_metric, "n_train": len(parts["train"])}
    return ProtocolResult(task, parts[report], y[report], scores, val_thresholds(task, y["val"], val_scores),
                          chosen, timing={"fit_s": time.perf_counter() - started})
