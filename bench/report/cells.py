"""From the selected frame to the long form, one row per (table row, table column): mean, std, n, CI
(`summarise`), the empty cells (`complete_grid`), the best per column (`mark_best`), and each row's change
from a reference row with its paired test and Holm-adjusted p (`add_deltas`)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.report.selection import COL_KEYS, ROW_KEYS, assign_variants, fraction_label, parse_spec, row_label, row_name

LONG_COLUMNS = ["method", "ablation", "pretrain_hash", "dataset", "protocol", "fraction", "mean", "std", "n",
                "records", "ci_lo", "ci_hi", "best", "delta", "delta_ci_lo", "delta_ci_hi", "p", "p_holm", "marker",
                "test", "variant", "kind", "metric", "prompt_set", "eval_hash", "source", "note", "contaminated"]


def stats_module():
    from bench.evaluation import stats

    return stats


def _cell_ci(cell: pd.DataFrame) -> tuple[float, float, str]:
    """CI of the seed mean (two-level bootstrap over the records' replicates); the stored CI for one record
    without replicates; NaN and a reason otherwise."""
    reps = [r for r in cell["replicates"] if r is not None and np.isfinite(r).any()]
    if len(reps) == len(cell):
        conf = float(cell["confidence"].iloc[0])
        lo, hi = stats_module().combined_ci(reps, confidence=conf, seed=0)
        return float(lo), float(hi), ""
    if len(cell) == 1 and cell["stored_ci"].iloc[0] is not None:
        lo, hi = cell["stored_ci"].iloc[0]
        return lo, hi, ""
    return np.nan, np.nan, f"no CI: {len(cell) - len(reps)} of {len(cell)} records lack bootstrap replicates"


def summarise(frame: pd.DataFrame, ci: bool = False) -> pd.DataFrame:
    """Long form: one row per (row key, column key) with mean, std (ddof=1), n of the finite values, the
    number of records (a record without the metric still counts) and, with `ci`, the combined CI."""
    if "variant" not in frame:
        frame = assign_variants(frame)
    cells = []
    for key, g in frame.groupby(ROW_KEYS + COL_KEYS, sort=False):
        values = g["value"].to_numpy(float)
        finite = np.isfinite(values)
        n = int(finite.sum())
        cell = dict(zip(ROW_KEYS + COL_KEYS, key))
        cell.update({
            "pretrain_hash": ",".join(sorted(set(g["pretrain_hash"]))),
            "eval_hash": ",".join(sorted(set(g["eval_hash"]))),
            "mean": float(values[finite].mean()) if n else np.nan,
            "std": float(values[finite].std(ddof=1)) if n > 1 else np.nan,
            "n": n, "records": len(g), "kind": "measured", "ci_lo": np.nan, "ci_hi": np.nan, "note": "",
            "prompt_set": ",".join(sorted({p for p in g["prompt_set"] if isinstance(p, str)})),
            "contaminated": any(bool(c) for c in g["contamination"]),
        })
        if ci and n:
            cell["ci_lo"], cell["ci_hi"], cell["note"] = _cell_ci(g[finite])
        cells.append(cell)
    long = pd.DataFrame(cells)
    for col in LONG_COLUMNS:
        if col not in long:
            long[col] = {"best": False, "marker": "", "test": "", "source": "", "note": "", "metric": "",
                         "contaminated": False}.get(col, np.nan)
    return long


def complete_grid(long: pd.DataFrame, columns: list[tuple]) -> pd.DataFrame:
    """Add the (row, column) pairs without any record as empty cells (n = 0, records = 0): the long form then
    has every cell of the table, and `missing` is explicit in csv and json too."""
    present = {(tuple(r[:3]), tuple(r[3:6])) for r in long[ROW_KEYS + COL_KEYS].itertuples(index=False)}
    fill = []
    for _, first in long.drop_duplicates(ROW_KEYS).iterrows():
        row = tuple(first[ROW_KEYS])
        for col in columns:
            if (row, col) not in present:
                fill.append({**dict(zip(ROW_KEYS, row)), **dict(zip(COL_KEYS, col)), "n": 0, "records": 0,
                             "mean": np.nan, "std": np.nan, "kind": first["kind"], "best": False,
                             "pretrain_hash": first["pretrain_hash"], "source": first["source"], "note": "",
                             "marker": "", "test": "", "prompt_set": "", "eval_hash": "", "contaminated": False})
    if not fill:
        return long
    return pd.concat([long, pd.DataFrame(fill).reindex(columns=long.columns)], ignore_index=True)


def mark_best(long: pd.DataFrame) -> pd.DataFrame:
    """`best` = the highest mean in its column (ties at the shown precision all marked), among measured rows
    (random-init included); quoted rows never compete. Columns with one competitor mark nothing."""
    long = long.copy()
    long["best"] = False
    competing = long[(long["kind"] != "quoted") & np.isfinite(long["mean"].astype(float))]
    for _, g in competing.groupby(COL_KEYS):
        if len(g) < 2:
            continue
        shown = g["mean"].astype(float).round(3)
        long.loc[g.index[shown == shown.max()], "best"] = True
    return long


@dataclass
class Comparison:
    delta: float = np.nan
    ci: tuple[float, float] = (np.nan, np.nan)
    p: float = np.nan
    test: str = ""
    note: str = ""


@lru_cache(maxsize=256)
def _predictions(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


def _scores(cell: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | str:
    """(sample ids, truth, scores, class names) of the cell's one record, by sample id, or why not."""
    path = cell["predictions"].iloc[0]
    if path is None or not Path(path).exists():
        return "predictions file missing"
    frame = _predictions(str(path)).sort_values("sample_id")
    score_cols = [c for c in frame.columns if c.startswith("score/")]
    true_cols = [c for c in frame.columns if c.startswith("true/")]
    names = [c[len("score/"):] for c in score_cols]
    if not score_cols or names != [c[len("true/"):] for c in true_cols]:
        return "predictions file lacks matching true/ and score/ columns"
    return frame["sample_id"].to_numpy(), frame[true_cols].to_numpy(float), frame[score_cols].to_numpy(float), names


def _delong(a: pd.DataFrame, b: pd.DataFrame, out: Comparison) -> Comparison:
    """DeLong's test of one record per side, from their predictions. The Δ shown becomes DeLong's own: where it
    leaves a class out of the macro (too few positives or negatives to estimate its variance), that differs from
    the difference of the records' macro AUCs, and the note names the classes."""
    sa, sb = _scores(a), _scores(b)
    reason = sa if isinstance(sa, str) else sb if isinstance(sb, str) else ""
    if not reason and (len(sa[0]) != len(sb[0]) or (sa[0] != sb[0]).any() or sa[3] != sb[3]
                       or (sa[1] != sb[1]).any()):
        reason = "predictions cover different samples, classes or truth"
    if reason:
        out.note = f"{reason}: not tested"
        return out
    res = stats_module().delong(sa[1], sa[2], sb[2], labels=sa[3])
    out.test = "delong"
    if not np.isfinite(res["p"]):
        out.note = f"DeLong p undefined ({res['reason']}): not tested"
        return out
    out.delta, out.p = float(res["delta"]), float(res["p"])
    left_out = {c: why for c, why in res["untested"].items() if np.isfinite(res["per_class"][c]["delta"])}
    if left_out:
        out.note = ("Δ and DeLong's test over the classes with estimable variance; left out: "
                    + ", ".join(f"{c} ({why.split(':')[0]})" for c, why in left_out.items()))
    return out


def compare_cells(a: pd.DataFrame, b: pd.DataFrame, test: str, metric: str) -> Comparison:
    """Row cell `a` vs reference cell `b` (records with a finite value): the paired test if both sides were
    evaluated on the same test set with aligned resamples; `n/a` with the reason otherwise. The Δ returned is
    the tested one (the difference of the seed means for the bootstrap; DeLong's, see `_delong`)."""
    out = Comparison(delta=float(a["value"].mean() - b["value"].mean()))
    ids = set(a["test_ids"]) | set(b["test_ids"])
    if None in ids:
        out.note = "test set unknown (records without bootstrap.test_ids_sha256): not tested"
        return out
    if len(ids) > 1:
        return Comparison(note="different test sets (bootstrap.test_ids_sha256 differ): not compared")
    if test == "delong" and metric == "auc":
        return _delong(a, b, out)
    if any(r is None for r in [*a["replicates"], *b["replicates"]]):
        out.note = "bootstrap replicates missing: not tested"
        return out
    if len(set(a["resampling"]) | set(b["resampling"])) > 1:
        out.note = "bootstrap resamples differ (resamples/seed): not tested"
        return out
    res = stats_module().paired_bootstrap(list(a["replicates"]), list(b["replicates"]), seed=0,
                                          point_a=list(a["value"]), point_b=list(b["value"]))
    out.delta, out.p, out.test = float(res["delta"]), float(res["p"]), "bootstrap"
    out.ci = (float(res["ci"][0]), float(res["ci"][1]))
    return out


def one_record_per_side(cell: pd.DataFrame, name: str, column: str) -> None:
    """DeLong compares two records' scores: with several seeds in a cell it would test the AUC of the
    seed-averaged scores while the cell shows the mean of the seeds' AUCs, so that is refused."""
    if len(cell) > 1:
        raise UserError(f"--test delong compares one record per side, but {name} has {len(cell)} records (seeds) "
                        f"in {column}; use --test bootstrap (the default), which pools seeds")


def resolve_reference(long: pd.DataFrame, spec: str) -> tuple[str, str, str]:
    """`--delta-to METHOD[:ABLATION][@HASH]` -> the row key it names (ablation defaults to `none`)."""
    method, ablation, variant = parse_spec(spec)
    rows = sorted({tuple(r) for r in long.loc[long["kind"] == "measured", ROW_KEYS].itertuples(index=False)})
    hashes = {tuple(r[:3]): r[3] for r in
              long.loc[long["kind"] == "measured", ROW_KEYS + ["pretrain_hash"]].itertuples(index=False)}
    cands = [r for r in rows if r[0] == method and (ablation is None or r[1] == ablation)
             and (variant is None or hashes[r].startswith(variant))]
    if ablation is None and any(r[1] == "none" for r in cands):
        cands = [r for r in cands if r[1] == "none"]
    names = ", ".join(sorted({row_name(r[0], r[1]) + (f"@{hashes[r][:8]}" if r[2] else "") for r in rows}))
    if not cands:
        raise UserError(f"--delta-to {spec}: no such row in the table; rows: {names}")
    if len(cands) > 1:
        raise UserError(f"--delta-to {spec} is ambiguous; name one of: "
                        + ", ".join(row_name(r[0], r[1]) + (f"@{hashes[r][:8]}" if r[2] else "") for r in cands))
    return cands[0]


def add_deltas(long: pd.DataFrame, frame: pd.DataFrame, reference: tuple[str, str, str], test: str,
               metric: str) -> pd.DataFrame:
    """Every other measured row's change from `reference` per column with the paired test's p; p-values
    Holm-adjusted across the datasets of each (protocol, fraction) per row; markers from the adjusted p. The Δ
    and the marker of a cell are always of one quantity: the test's own Δ is shown, and DeLong, which compares
    two records, is refused for a cell of several (`one_record_per_side`)."""
    stats = stats_module()
    long = long.copy()
    if "variant" not in frame:
        frame = assign_variants(frame)
    finite = frame[np.isfinite(frame["value"])]
    cells = {k: g for k, g in finite.groupby(ROW_KEYS + COL_KEYS, sort=False)}
    long["kind"] = ["reference" if (m, a, v) == tuple(reference) and k == "measured" else k
                    for m, a, v, k in zip(long["method"], long["ablation"], long["variant"], long["kind"])]
    for i, row in long.iterrows():
        if row["kind"] != "measured" or not row["n"]:
            continue
        col = tuple(row[COL_KEYS])
        ref = cells.get((*reference, *col))
        if ref is None:
            long.at[i, "note"] = join_notes(row["note"], "the reference row has no value here: not compared")
            continue
        cell = cells[(*tuple(row[ROW_KEYS]), *col)]
        if test == "delong" and metric == "auc":
            column = " ".join(str(v) for v in (col[0], col[1], fraction_label(col[2])))
            one_record_per_side(cell, row_label(*row[ROW_KEYS]), column)
            one_record_per_side(ref, row_label(*reference) + " (the reference)", column)
        cmp = compare_cells(cell, ref, test, metric)
        long.at[i, "delta"], long.at[i, "p"], long.at[i, "test"] = cmp.delta, cmp.p, cmp.test
        long.at[i, "delta_ci_lo"], long.at[i, "delta_ci_hi"] = cmp.ci
        long.at[i, "note"] = join_notes(row["note"], cmp.note)
    tested = long[np.isfinite(long["p"].astype(float))]
    for _, g in tested.groupby(ROW_KEYS + ["protocol", "fraction"]):
        adjusted = stats.holm(g["p"].astype(float).tolist())
        long.loc[g.index, "p_holm"] = adjusted
        long.loc[g.index, "marker"] = [stats.significance_marker(p) for p in adjusted]
    return long


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
