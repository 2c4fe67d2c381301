import numpy as np
import pytest

from bench.errors import UserError
from bench.table import build_table


def _rec(method, ablation, seed, protocol, auc, phash="h1" * 8):
    metrics = {} if auc is None else {"auc": auc}
    return {"method": method, "ablation": ablation, "pretrain_hash": phash, "pretrain_seed": seed,
            "eval_seed": 0, "dataset": "chexpert", "protocol": protocol, "fraction": 1.0, "metrics": metrics}


def test_mean_std_over_seeds_with_count():
    recs = [_rec("clip", "none", s, "zero-shot", v) for s, v in enumerate([0.7, 0.8, 0.9])]
    out = build_table(recs, "auc")
    assert f"0.800±{np.std([0.7, 0.8, 0.9], ddof=1):.3f} (n=3)" in out


def test_a_missing_metric_or_cell_is_shown_as_missing():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.7), _rec("clip", "none", 0, "linear-probe", None),
            _rec("random-init", "clip", 0, "zero-shot", 0.5)]
    out = build_table(recs, "auc")
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "missing" in lines["clip"]  # its linear-probe record has no AUC
    assert "missing" in lines["random-init"]  # it has no linear-probe record at all
    assert "chexpert linear-probe" in out


def test_different_configurations_are_never_pooled():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.7, "a" * 16), _rec("clip", "none", 0, "zero-shot", 0.9, "b" * 16)]
    out = build_table(recs, "auc")
    assert "0.700 (n=1)" in out and "0.900 (n=1)" in out and "variant" in out


def test_formats():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.75)]
    assert "\\toprule" in build_table(recs, "auc", fmt="latex")
    csv = build_table(recs, "auc", fmt="csv")
    assert csv.splitlines()[0].startswith("method,ablation,pretrain_hash,dataset,protocol,fraction,mean")
    with pytest.raises(UserError, match="valid formats"):
        build_table(recs, "auc", fmt="xlsx")
    with pytest.raises(UserError, match="no results records"):
        build_table([], "auc")
