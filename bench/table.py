"""`bench table`: records -> rows (method, ablation[, variant]) x columns (dataset, protocol[, fraction]),
cells mean±std (n) over seeds. Nothing is dropped: a cell without a value says `missing`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.errors import UserError

FORMATS = ("markdown", "csv", "latex")
MISSING = "missing"


def records_frame(records: list[dict], metric: str) -> pd.DataFrame:
    rows = []
    for r in records:
        value = r.get("metrics", {}).get(metric)
        rows.append({
            "method": r["method"], "ablation": r["ablation"], "pretrain_hash": r["pretrain_hash"],
            "dataset": r["dataset"], "protocol": r["protocol"], "fraction": r["fraction"],
            "pretrain_seed": r["pretrain_seed"], "eval_seed": r["eval_seed"],
            "value": np.nan if value is None else float(value),
        })
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per (row key, column key) with mean, std (ddof=1), n of the finite values and
    the number of records (a record without the metric still counts as a record)."""
    keys = ["method", "ablation", "pretrain_hash", "dataset", "protocol", "fraction"]
    return df.groupby(keys, dropna=False)["value"].agg(
        mean=lambda v: v.dropna().mean() if v.notna().any() else np.nan,
        std=lambda v: v.dropna().std(ddof=1) if v.notna().sum() > 1 else np.nan,
        n="count", records="size").reset_index()


def _cell(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return MISSING
    if n == 1:
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f}±{std:.3f} (n={n})"


def build_table(records: list[dict], metric: str = "auc", protocol: str | None = None,
                fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not records:
        raise UserError("no results records found; run `bench run --method clip` first or pass --results-dir")
    df = records_frame(records, metric)
    if protocol:
        df = df[df["protocol"] == protocol]
        if df.empty:
            raise UserError(f"no records for protocol {protocol!r}")
    long = summarise(df)
    if fmt == "csv":
        return long.assign(metric=metric).to_csv(index=False)

    # several configurations of one method/ablation are never pooled: each gets its own row
    variants = long.groupby(["method", "ablation"])["pretrain_hash"].nunique()
    long["row"] = [
        (m, a, h[:8] if variants[(m, a)] > 1 else "") for m, a, h in zip(long.method, long.ablation, long.pretrain_hash)
    ]
    several_fractions = long.groupby(["dataset", "protocol"])["fraction"].nunique().max() > 1
    long["col"] = [f"{d} {p}" + (f" {f:g}" if several_fractions else "")
                   for d, p, f in zip(long.dataset, long.protocol, long.fraction)]
    columns = sorted(long["col"].unique())
    rows = sorted(long["row"].unique(), key=lambda r: (r[0] == "random-init", r))
    show_variant = any(r[2] for r in rows)
    cells = {(r, c): _cell(m, s, n) for r, c, m, s, n in zip(long.row, long.col, long["mean"], long["std"], long.n)}
    header = ["method", "ablation", *(["variant"] if show_variant else []), *columns]
    body = [[r[0], r[1], *([r[2]] if show_variant else []), *[cells.get((r, c), MISSING) for c in columns]]
            for r in rows]
    table = tabulate(body, headers=header, tablefmt="github" if fmt == "markdown" else "latex_booktabs",
                     disable_numparse=True)
    return f"{metric.upper()} (mean±std over seeds, n = records)\n\n{table}" if fmt == "markdown" else table
