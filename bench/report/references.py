"""Quoted (published) numbers: a reference file's rows, validated, and the cells they fill in a table's
columns. Quoted rows never mix with measured ones."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.report.selection import parse_fraction

QUOTED = "(quoted)"
REFERENCE_COLUMNS = ("method", "ablation", "dataset", "protocol", "fraction", "metric", "value", "std", "source")
REQUIRED_REFERENCE = ("method", "dataset", "protocol", "metric", "value")


def load_reference(path: str | Path) -> pd.DataFrame:
    """Published numbers from a YAML (a list of mappings, or {results: [...]}) or CSV file, validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"reference file {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict):
                data = next((data[k] for k in ("results", "rows", "reference") if k in data), None)
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise UserError(f"reference file {path}: expected a list of mappings (method, dataset, protocol, "
                                "metric, value, ...) or a mapping with a `results` list")
            df = pd.DataFrame(data)
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise UserError(f"reference file {path}: unknown format {suffix or '(no suffix)'!r}; use .yaml, .yml or "
                            ".csv")
    except UserError:
        raise
    except Exception as exc:  # yaml.YAMLError, pandas.errors.ParserError, UnicodeDecodeError
        raise UserError(f"reference file {path}: not readable as {suffix[1:]} "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if df.empty:
        raise UserError(f"reference file {path}: no rows")
    df.columns = [str(c).strip().lower() for c in df.columns]
    absent = [c for c in REQUIRED_REFERENCE if c not in df.columns]
    if absent:
        raise UserError(f"reference file {path}: missing column(s) {', '.join(absent)}; needs "
                        f"{', '.join(REQUIRED_REFERENCE)} (optional: ablation, fraction, std, source)")
    for col in REQUIRED_REFERENCE[:4]:
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            raise UserError(f"reference file {path}: empty {col!r} in row {int(np.flatnonzero(blank)[0]) + 1}")
    out = pd.DataFrame({c: df[c].astype(str).str.strip() for c in REQUIRED_REFERENCE[:4]})
    out["ablation"] = df["ablation"].fillna("").astype(str).str.strip() if "ablation" in df else ""
    out["source"] = df["source"].fillna("").astype(str).str.strip() if "source" in df else ""

    def numeric(col: str, default: float | None) -> pd.Series:
        raw = df[col] if col in df else pd.Series([None] * len(df))
        values = []
        for i, v in enumerate(raw):
            if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
                if default is None and col == "value":
                    raise UserError(f"reference file {path}: empty 'value' in row {i + 1}")
                values.append(np.nan if default is None else default)
                continue
            try:
                values.append(parse_fraction(v) if col == "fraction" else float(str(v).strip()))
            except (ValueError, UserError):
                raise UserError(f"reference file {path}: non-numeric {col!r} {v!r} in row {i + 1}") from None
        return pd.Series(values, dtype=float)

    out["value"] = numeric("value", None)
    out["std"] = numeric("std", None)
    out["fraction"] = numeric("fraction", 1.0)
    return out[list(REFERENCE_COLUMNS)]


def quoted_cells(reference: pd.DataFrame, metric: str, columns: Iterable[tuple]) -> tuple[pd.DataFrame, int]:
    """Quoted rows of `metric` in the table's columns (dataset, protocol, fraction) -> (long rows, how many of the
    metric's quoted values fall outside those columns)."""
    columns = list(columns)
    ref = reference[reference["metric"].str.lower() == metric.lower()]
    rows, outside = [], 0
    for r in ref.itertuples(index=False):
        col = next((c for c in columns if c[0] == r.dataset and c[1] == r.protocol and math.isclose(c[2], r.fraction)),
                   None)
        if col is None:
            outside += 1
            continue
        rows.append({"method": f"{r.method} {QUOTED}", "ablation": r.ablation, "variant": "", "pretrain_hash": "",
                     "dataset": col[0], "protocol": col[1], "fraction": col[2], "mean": r.value, "std": r.std,
                     "n": np.nan, "records": 0, "kind": "quoted", "source": r.source})
    return pd.DataFrame(rows), outside
