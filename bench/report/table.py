"""`bench table`: results records -> a table a paper can print.

Three layers, each a plain function:
  loader      `select_records` (filters) and `load_frame`: records -> a tidy frame, one row per record, with
              the metric's value, its stored bootstrap replicates and the identity of its test set;
  aggregator  `summarise`, `mark_best`, `add_deltas`, `quoted_cells`: the frame -> the long form, one row per
              (table row, table column) with mean, std, n, CI, best, delta, p, Holm-adjusted p, marker;
  renderers   markdown (github), latex (booktabs), csv and json (both the long form).

Rows are (method, ablation[, variant]): several configurations (pretrain hashes, or eval-settings hashes within
one cell) are never pooled. Columns are datasets (x protocol x label fraction when several are present).
Quoted (published) numbers are extra rows that never mix with measured ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.core.errors import UserError

FORMATS = ("markdown", "latex", "csv", "json")
TESTS = ("bootstrap", "delong")
MISSING = "missing"
RANDOM_INIT = "random-init"
QUOTED = "(quoted)"
PROTOCOL_ORDER = {"zero-shot": 0, "linear-probe": 1, "fine-tune": 2}
ROW_KEYS = ["method", "ablation", "variant"]
COL_KEYS = ["dataset", "protocol", "fraction"]
LONG_COLUMNS = ["method", "ablation", "pretrain_hash", "dataset", "protocol", "fraction", "mean", "std", "n",
                "records", "ci_lo", "ci_hi", "best", "delta", "delta_ci_lo", "delta_ci_hi", "p", "p_holm", "marker",
                "test", "variant", "kind", "metric", "prompt_set", "eval_hash", "source", "note"]


# ----------------------------------------------------------------------------------------------- loader

def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`METHOD[:ABLATION][@HASH-PREFIX]` -> (method, ablation or None, pretrain-hash prefix or None)."""
    head, _, variant = spec.strip().partition("@")
    method, _, ablation = head.partition(":")
    if not method:
        raise UserError(f"malformed method spec {spec!r}; expected METHOD[:ABLATION][@HASH]")
    return method, ablation or None, variant or None


def parse_fraction(value: float | str) -> float:
    """0.1, '0.1' or '10%' -> 0.1."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"malformed label fraction {value!r}; use e.g. 0.1 or 10%") from None
    if not 0 < f <= 1:
        raise UserError(f"label fraction {value!r} is not in (0, 1]; use e.g. 0.1 or 10%")
    return f


def fraction_label(f: float) -> str:
    return f"{f * 100:g}%"


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def _row_name(method: str, ablation: str) -> str:
    return f"{method}:{ablation}"


def _spec_matches(rec: dict, spec: tuple[str, str | None, str | None]) -> bool:
    method, ablation, variant = spec
    return (rec["method"] == method and (ablation is None or rec["ablation"] == ablation)
            and (variant is None or str(rec.get("pretrain_hash", "")).startswith(variant)))


def select_records(records: list[dict], protocol: str | None = None, fraction: float | str | None = None,
                   datasets: str | Sequence[str] | None = None,
                   methods: str | Sequence[str] | None = None) -> list[dict]:
    """The records the filters keep. A filter that matches nothing is an error naming what exists.

    `methods` are METHOD[:ABLATION][@HASH] specs; the random-init baseline of a selected method is kept too."""
    if not records:
        raise UserError("no results records found; run `bench run --method clip` first or pass --results-dir")
    out = list(records)
    applied: list[str] = []

    def where() -> str:
        return f" (with {', '.join(applied)})" if applied else ""

    wanted = _names(datasets)
    if wanted:
        present = sorted({r["dataset"] for r in out})
        unknown = [d for d in wanted if d not in present]
        if unknown:
            raise UserError(f"no records for dataset(s) {', '.join(unknown)}{where()}; "
                            f"datasets present: {', '.join(present)}")
        out = [r for r in out if r["dataset"] in wanted]
        applied.append(f"datasets {','.join(wanted)}")
    if protocol:
        present = sorted({r["protocol"] for r in out}, key=lambda p: (PROTOCOL_ORDER.get(p, 9), p))
        if protocol not in present:
            raise UserError(f"no records for protocol {protocol!r}{where()}; protocols present: {', '.join(present)}")
        out = [r for r in out if r["protocol"] == protocol]
        applied.append(f"protocol {protocol}")
    if fraction is not None:
        f = parse_fraction(fraction)
        present = sorted({float(r.get("fraction", 1.0)) for r in out})
        if not any(math.isclose(f, p) for p in present):
            raise UserError(f"no records at label fraction {fraction_label(f)}{where()}; fractions present: "
                            f"{', '.join(fraction_label(p) for p in present)}")
        out = [r for r in out if math.isclose(float(r.get("fraction", 1.0)), f)]
        applied.append(f"fraction {fraction_label(f)}")
    specs = [parse_spec(s) for s in _names(methods)]
    if specs:
        present = sorted({_row_name(r["method"], r["ablation"]) for r in out})
        unknown = [s for s in _names(methods) if not any(_spec_matches(r, parse_spec(s)) for r in out)]
        if unknown:
            raise UserError(f"no records for method(s) {', '.join(unknown)}{where()}; "
                            f"methods present (method:ablation): {', '.join(present)}")
        chosen = {s[0] for s in specs}
        out = [r for r in out if any(_spec_matches(r, s) for s in specs)
               or (r["method"] == RANDOM_INIT and r["ablation"] in chosen)]
    return out


def _number(value) -> float:
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def prompt_set_key(record: dict, name: str) -> str | None:
    """The key of `record["prompt_sets"]` that `name` means: the exact key, or the one key `name@vK`."""
    sets = record.get("prompt_sets") or {}
    if name in sets:
        return name
    matches = [k for k in sets if k.split("@")[0] == name]
    if len(matches) > 1:
        raise UserError(f"prompt set {name!r} is ambiguous in {record.get('record_path', 'a record')}: "
                        f"{', '.join(matches)}; name the version, e.g. --prompt-set {matches[0]}")
    return matches[0] if matches else None


def load_frame(records: list[dict], metric: str, prompt_set: str | None = None) -> pd.DataFrame:
    """One row per record: its identity, the metric's value (NaN when absent), the stored bootstrap replicates
    and CI of that metric (None when absent), the test set's identity and the predictions file."""
    rows = []
    for r in records:
        boot = r.get("bootstrap") or {}
        value = (r.get("metrics") or {}).get(metric)
        reps = (boot.get("replicates") or {}).get(metric)
        ci = (boot.get("ci") or {}).get(metric)
        pred = (Path(r["record_path"]).parent / r["predictions_file"]
                if r.get("record_path") and r.get("predictions_file") else None)
        pset = None
        if prompt_set and r["protocol"] == "zero-shot":
            sets = r.get("prompt_sets") or {}
            pset = prompt_set_key(r, prompt_set)
            value = (sets.get(pset) or {}).get(metric) if pset else None
            if pset is None or pset != next(iter(sets), None):
                reps = ci = pred = None  # replicates and predictions are the primary prompt set's
        rows.append({
            "method": r["method"], "ablation": r["ablation"], "pretrain_hash": str(r.get("pretrain_hash", "")),
            "eval_hash": str(r.get("eval_hash", "")), "dataset": r["dataset"], "protocol": r["protocol"],
            "fraction": float(r.get("fraction", 1.0)), "pretrain_seed": r.get("pretrain_seed"),
            "eval_seed": r.get("eval_seed"), "value": _number(value),
            "replicates": None if reps is None else np.asarray(reps, dtype=float),
            "stored_ci": None if ci is None or any(c is None for c in ci) else (float(ci[0]), float(ci[1])),
            "confidence": float(boot.get("confidence", 0.95)),
            "test_ids": boot.get("test_ids_sha256"),
            "resampling": (boot.get("resamples"), boot.get("seed")) if boot else None,
            "predictions": pred, "prompt_set": pset, "record_path": r.get("record_path"),
        })
    return pd.DataFrame(rows, columns=[
        "method", "ablation", "pretrain_hash", "eval_hash", "dataset", "protocol", "fraction", "pretrain_seed",
        "eval_seed", "value", "replicates", "stored_ci", "confidence", "test_ids", "resampling", "predictions",
        "prompt_set", "record_path"])


def assign_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `variant`: empty unless one method/ablation has several pretrain hashes (then the hash prefix), or one
    cell holds several eval-settings hashes (then also `eval <hash>`): different configurations never pool."""
    frame = frame.copy()
    if frame.empty:
        frame["variant"] = []
        return frame
    several = frame.groupby(["method", "ablation"])["pretrain_hash"].transform("nunique") > 1
    evals = frame.groupby(["method", "ablation", "pretrain_hash", *COL_KEYS])["eval_hash"].transform("nunique") > 1
    frame["variant"] = [" ".join(p for p in (ph[:8] if s else "", f"eval {eh[:8]}" if e else "") if p)
                        for ph, eh, s, e in zip(frame.pretrain_hash, frame.eval_hash, several, evals)]
    return frame


def metrics_present(records: list[dict]) -> list[str]:
    return sorted({m for r in records for m in (r.get("metrics") or {})}
                  | {m for r in records for s in (r.get("prompt_sets") or {}).values() for m in s})


def selected_frame(records: list[dict], metric: str = "auc", protocol: str | None = None, *,
                   fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
                   methods: str | Sequence[str] | None = None, prompt_set: str | None = None,
                   notes: list[str] | None = None) -> pd.DataFrame:
    """Filters + checks + `load_frame` + `assign_variants`: the loader as the table and the plots use it.
    Errors name what exists; `notes` collects what the reader should know."""
    selected = select_records(records, protocol, fraction, datasets, methods)
    present = metrics_present(selected)
    if metric not in present:
        raise UserError(f"no record has metric {metric!r}; metrics present: {', '.join(present) or 'none'}")
    if prompt_set:
        zero = [r for r in selected if r["protocol"] == "zero-shot"]
        if not zero and notes is not None:
            notes.append(f"--prompt-set {prompt_set}: no zero-shot records selected; ignored")
        elif zero and not any(prompt_set_key(r, prompt_set) for r in zero):
            sets = sorted({k for r in zero for k in (r.get("prompt_sets") or {})})
            raise UserError(f"no zero-shot record has prompt set {prompt_set!r}; prompt sets present: "
                            f"{', '.join(sets) or 'none'}")
    frame = assign_variants(load_frame(selected, metric, prompt_set))
    frame.attrs["metrics_present"] = present
    return frame


def row_label(method: str, ablation: str, variant: str = "") -> str:
    return f"{method}:{ablation}" + (f" {variant}" if variant else "")


# ------------------------------------------------------------------------------------------------ quoted

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


# -------------------------------------------------------------------------------------------- aggregator

def _stats():
    from bench.evaluation import stats

    return stats


def _cell_ci(cell: pd.DataFrame) -> tuple[float, float, str]:
    """CI of the seed mean (two-level bootstrap over the records' replicates); the stored CI for one record
    without replicates; NaN and a reason otherwise."""
    reps = [r for r in cell["replicates"] if r is not None and np.isfinite(r).any()]
    if len(reps) == len(cell):
        conf = float(cell["confidence"].iloc[0])
        lo, hi = _stats().combined_ci(reps, confidence=conf, seed=0)
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
        })
        if ci and n:
            cell["ci_lo"], cell["ci_hi"], cell["note"] = _cell_ci(g[finite])
        cells.append(cell)
    long = pd.DataFrame(cells)
    for col in LONG_COLUMNS:
        if col not in long:
            long[col] = {"best": False, "marker": "", "test": "", "source": "", "note": "", "metric": ""}.get(
                col, np.nan)
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
                             "marker": "", "test": "", "prompt_set": "", "eval_hash": ""})
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


def _mean_scores(cell: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(sample ids, truth, scores averaged per sample over the cell's records), or why not."""
    if any(p is None or not Path(p).exists() for p in cell["predictions"]):
        return "predictions file missing"
    frames = [_predictions(str(p)) for p in cell["predictions"]]
    score_cols = [c for c in frames[0].columns if c.startswith("score/")]
    true_cols = [c for c in frames[0].columns if c.startswith("true/")]
    if not score_cols or any(list(f.columns) != list(frames[0].columns) for f in frames):
        return "predictions files disagree on their classes"
    both = pd.concat(frames)
    truth = both.groupby("sample_id", sort=True)[true_cols]
    if (truth.nunique() > 1).any().any():
        return "predictions files disagree on the truth"
    scores = both.groupby("sample_id", sort=True)[score_cols].mean()
    return scores.index.to_numpy(), truth.first().to_numpy(float), scores.to_numpy(float)


def compare_cells(a: pd.DataFrame, b: pd.DataFrame, test: str, metric: str) -> Comparison:
    """Row cell `a` vs reference cell `b` (records with a finite value): the paired test if both sides were
    evaluated on the same test set with aligned resamples; `n/a` with the reason otherwise."""
    out = Comparison(delta=float(a["value"].mean() - b["value"].mean()))
    ids = set(a["test_ids"]) | set(b["test_ids"])
    if None in ids:
        out.note = "test set unknown (records without bootstrap.test_ids_sha256): not tested"
        return out
    if len(ids) > 1:
        return Comparison(note="different test sets (bootstrap.test_ids_sha256 differ): not compared")
    if test == "delong" and metric == "auc":
        sa, sb = _mean_scores(a), _mean_scores(b)
        reason = sa if isinstance(sa, str) else sb if isinstance(sb, str) else ""
        if not reason and (len(sa[0]) != len(sb[0]) or (sa[0] != sb[0]).any() or (sa[1] != sb[1]).any()):
            reason = "predictions cover different samples or truth"
        if reason:
            out.note = f"{reason}: not tested"
            return out
        res = _stats().delong(sa[1], sa[2], sb[2])
        out.p, out.test = float(res["p"]), "delong"
        if not np.isfinite(out.p):
            out.note = "DeLong p undefined (no class with both labels, or no estimable variance): not tested"
        return out
    if any(r is None for r in [*a["replicates"], *b["replicates"]]):
        out.note = "bootstrap replicates missing: not tested"
        return out
    if len(set(a["resampling"]) | set(b["resampling"])) > 1:
        out.note = "bootstrap resamples differ (resamples/seed): not tested"
        return out
    res = _stats().paired_bootstrap(list(a["replicates"]), list(b["replicates"]), seed=0,
                                    point_a=list(a["value"]), point_b=list(b["value"]))
    out.p, out.test = float(res["p"]), "bootstrap"
    out.ci = (float(res["ci"][0]), float(res["ci"][1]))
    return out


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
    names = ", ".join(sorted({_row_name(r[0], r[1]) + (f"@{hashes[r][:8]}" if r[2] else "") for r in rows}))
    if not cands:
        raise UserError(f"--delta-to {spec}: no such row in the table; rows: {names}")
    if len(cands) > 1:
        raise UserError(f"--delta-to {spec} is ambiguous; name one of: "
                        + ", ".join(_row_name(r[0], r[1]) + (f"@{hashes[r][:8]}" if r[2] else "") for r in cands))
    return cands[0]


def add_deltas(long: pd.DataFrame, frame: pd.DataFrame, reference: tuple[str, str, str], test: str,
               metric: str) -> pd.DataFrame:
    """Every other measured row's change from `reference` per column with the paired test's p; p-values
    Holm-adjusted across the datasets of each (protocol, fraction) per row; markers from the adjusted p."""
    stats = _stats()
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
            long.at[i, "note"] = _join(row["note"], "the reference row has no value here: not compared")
            continue
        cmp = compare_cells(cells[(*tuple(row[ROW_KEYS]), *col)], ref, test, metric)
        long.at[i, "delta"], long.at[i, "p"], long.at[i, "test"] = cmp.delta, cmp.p, cmp.test
        long.at[i, "delta_ci_lo"], long.at[i, "delta_ci_hi"] = cmp.ci
        long.at[i, "note"] = _join(row["note"], cmp.note)
    tested = long[np.isfinite(long["p"].astype(float))]
    for _, g in tested.groupby(ROW_KEYS + ["protocol", "fraction"]):
        adjusted = stats.holm(g["p"].astype(float).tolist())
        long.loc[g.index, "p_holm"] = adjusted
        long.loc[g.index, "marker"] = [stats.significance_marker(p) for p in adjusted]
    return long


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# --------------------------------------------------------------------------------------------- the table

@dataclass
class Table:
    """The aggregated table: the long form plus what the renderers need."""
    metric: str
    long: pd.DataFrame
    rows: list[tuple]
    columns: list[tuple]
    column_labels: dict[tuple, str]
    title: str
    notes: list[str] = field(default_factory=list)
    ci: bool = False
    reference: tuple | None = None


def _marker_legend() -> str:
    mark = _stats().significance_marker
    parts, seen = [], set()
    for t in (0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001):
        below = mark(t * (1 - 1e-9))
        if below and below not in seen and mark(t * 1.000001) != below:
            parts.append(f"{below} p<{t:g}")
            seen.add(below)
    return ", ".join(parts) or "none"


def aggregate(records: list[dict], metric: str = "auc", protocol: str | None = None, *,
              fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
              methods: str | Sequence[str] | None = None, delta_to: str | None = None, test: str = "bootstrap",
              ci: bool = False, prompt_set: str | None = None, reference: str | Path | None = None) -> Table:
    """Filters, loads, summarises, marks the best, adds deltas and quoted rows: everything but rendering."""
    if test not in TESTS:
        raise UserError(f"unknown test {test!r}; valid tests: {', '.join(TESTS)}")
    notes: list[str] = []
    frame = selected_frame(records, metric, protocol, fraction=fraction, datasets=datasets, methods=methods,
                           prompt_set=prompt_set, notes=notes)
    present = frame.attrs["metrics_present"]
    long = summarise(frame, ci=ci)
    ref_row = resolve_reference(long, delta_to) if delta_to else None

    columns = sorted({tuple(c) for c in long[COL_KEYS].itertuples(index=False)},
                     key=lambda c: (_order(_names(datasets), c[0]), PROTOCOL_ORDER.get(c[1], 9), c[1], c[2]))
    if reference is not None:
        quoted, outside = quoted_cells(load_reference(reference), metric, columns)
        if outside:
            notes.append(f"{outside} quoted {metric} value(s) in {Path(reference).name} are outside this table's "
                         "columns and not shown")
        if len(quoted):
            long = pd.concat([long, quoted.reindex(columns=long.columns)], ignore_index=True)
            for col in ("marker", "test", "note", "source", "prompt_set", "eval_hash", "ablation", "variant"):
                long[col] = long[col].fillna("")
    long = mark_best(complete_grid(long, columns))
    long["metric"] = metric
    if ref_row is not None:
        long = add_deltas(long, frame, ref_row, test, metric)

    protocols = sorted({c[1] for c in columns}, key=lambda p: (PROTOCOL_ORDER.get(p, 9), p))
    fractions = sorted({c[2] for c in columns})
    labels = {c: " ".join([c[0], *([c[1]] if len(protocols) > 1 else []),
                           *([fraction_label(c[2])] if len(fractions) > 1 else [])]) for c in columns}
    rows = _row_order(long, _names(methods), ref_row)

    scope = ", ".join([*([protocols[0]] if len(protocols) == 1 else []),
                       *([f"{fraction_label(fractions[0])} labels"] if len(fractions) == 1 else [])])
    conf = frame["confidence"].iloc[0] if len(frame) else 0.95
    what = "mean±std over seeds (n = records with a value)"
    if ci:
        what += f" [{conf:.0%} CI of the mean: seeds and test resamples, two-level bootstrap]"
    if ref_row is not None:
        what = (f"change from {_row_name(*ref_row[:2])}{' ' + ref_row[2] if ref_row[2] else ''} (its row: absolute "
                f"{what}); other rows: Δ mean{', Δ CI' if ci and test == 'bootstrap' else ''} and significance marker")
    title = f"{metric.upper()}{' (' + scope + ')' if scope else ''}: {what}; bold = best per column"

    if ref_row is not None:
        delong = test == "delong" and metric == "auc"
        if test == "delong" and not delong:
            notes.append(f"DeLong applies to AUC only; {metric} is compared with the paired bootstrap")
        notes.append(
            ("Test: DeLong on the macro AUC (paired, same test samples); with several seeds, each row's per-sample "
             "scores are averaged over its records first." if delong else
             "Test: paired bootstrap over the stored test-set replicates (same resamples on both sides; seeds "
             "pooled by a two-level bootstrap).")
            + " p-values Holm-corrected across the datasets of each (protocol, fraction), per row. Markers "
            f"(Holm-adjusted p): {_marker_legend()}. Pairs on different test sets are not compared (n/a).")
    used = sorted({p for p in frame["prompt_set"] if isinstance(p, str)})
    if prompt_set and used:
        notes.append(f"zero-shot cells use prompt set {', '.join(used)}; records without it: missing"
                     + ("; CIs/tests need the primary set's replicates" if ci or ref_row else ""))
    if any(long["variant"].fillna("") != ""):
        notes.append("variant = pretrain-config hash prefix (and `eval <hash>` for differing eval settings): "
                     "different configurations are never pooled")
    for _, r in long[long["kind"] == "quoted"].drop_duplicates(["method", "source"]).iterrows():
        notes.append(f"{r['method']}: {r['source'] or 'source not given'}; never pooled, best-marked or compared")
    for _, r in long[long["note"].fillna("") != ""].iterrows():
        notes.append(f"{_row_name(r['method'], r['ablation'])}{' ' + r['variant'] if r['variant'] else ''}, "
                     f"{labels[tuple(r[COL_KEYS])]}: {r['note']}")
    notes.append(f"metrics in these records: {', '.join(present)}")
    return Table(metric, long, rows, columns, labels, title, notes, ci, ref_row)


def _order(given: list[str], name: str) -> tuple:
    return (given.index(name), "") if name in given else (len(given), name)


def _row_order(long: pd.DataFrame, methods: list[str], ref_row: tuple | None) -> list[tuple]:
    keys = {(tuple(r[:3]), r[3]) for r in long[ROW_KEYS + ["kind"]].itertuples(index=False)}
    specs = [parse_spec(s) for s in methods]

    def rank(item):
        (m, a, v), kind = item
        pos = next((i for i, s in enumerate(specs) if s[0] == m and s[1] in (None, a)), len(specs))
        return (kind == "quoted", (m, a, v) != ref_row, m == RANDOM_INIT, pos, m, a != "none", a, v)

    return [k for k, _ in sorted(keys, key=rank)]


# ----------------------------------------------------------------------------------------------- renderers

def _fmt(x: float) -> str:
    return f"{x:.3f}"


def cell_text(cell: pd.Series | None, ci: bool = False) -> str:
    """One table cell: `mean±std (n=k)`, `mean (n=1)`, a delta `+0.012** (n=3)`, or `missing`."""
    if cell is None or not np.isfinite(float(cell["mean"])):
        return MISSING
    mean, std = float(cell["mean"]), float(cell["std"])
    if cell["kind"] == "quoted":
        return _fmt(mean) + (f"±{_fmt(std)}" if np.isfinite(std) else "")
    n = int(cell["n"])
    absolute = f"{_fmt(mean)} (n=1)" if n == 1 else f"{_fmt(mean)}±{_fmt(std)} (n={n})"
    if cell["kind"] == "measured" and isinstance(cell["note"], str) and "not compared" in cell["note"]:
        return f"{absolute} [Δ n/a]"
    if cell["kind"] == "measured" and np.isfinite(float(cell["delta"])):
        text = f"{float(cell['delta']):+.3f}{cell['marker'] or ''} (n={n})"
        if not np.isfinite(float(cell["p"])):
            text += " [test n/a]"
        elif ci and np.isfinite(float(cell["delta_ci_lo"])):
            text += f" [{float(cell['delta_ci_lo']):+.3f}, {float(cell['delta_ci_hi']):+.3f}]"
        return text
    if ci:
        lo, hi = float(cell["ci_lo"]), float(cell["ci_hi"])
        absolute += f" [{_fmt(lo)}, {_fmt(hi)}]" if np.isfinite(lo) else " [no CI]"
    return absolute


def _grid(table: Table, bold: tuple[str, str], escape=lambda s: s) -> tuple[list[str], list[list[str]]]:
    index = {(tuple(r[ROW_KEYS]), tuple(r[COL_KEYS])): r for _, r in table.long.iterrows()}
    show_variant = any(r[2] for r in table.rows)
    header = ["method", "ablation", *(["variant"] if show_variant else []),
              *[table.column_labels[c] for c in table.columns]]
    body = []
    for row in table.rows:
        cells = []
        for c in table.columns:
            cell = index.get((row, c))
            text = escape(cell_text(cell, table.ci))
            cells.append(f"{bold[0]}{text}{bold[1]}" if cell is not None and bool(cell["best"]) else text)
        body.append([escape(row[0]), escape(row[1]), *([escape(row[2])] if show_variant else []), *cells])
    return [escape(h) for h in header], body


def _markdown_escape(text: str) -> str:
    """Significance stars and pipes as literal characters (`\\*`), so they never turn into emphasis."""
    return str(text).replace("|", "\\|").replace("*", "\\*")


def render_markdown(table: Table) -> str:
    header, body = _grid(table, ("**", "**"), _markdown_escape)
    grid = tabulate(body, headers=header, tablefmt="github", disable_numparse=True)
    notes = "\n".join(f"- {_markdown_escape(n)}" for n in table.notes)
    return f"{_markdown_escape(table.title)}\n\n{grid}\n\n{notes}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def render_latex(table: Table) -> str:
    header, body = _grid(table, (r"\textbf{", "}"), _latex_escape)
    lines = [f"% {_latex_escape(table.title)}", *[f"% {_latex_escape(n)}" for n in table.notes],
             r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule",
             *[" & ".join(row) + r" \\" for row in body], r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def long_form(table: Table) -> pd.DataFrame:
    """The long form in the table's row and column order (csv and json)."""
    rank_row = {r: i for i, r in enumerate(table.rows)}
    rank_col = {c: i for i, c in enumerate(table.columns)}
    long = table.long.copy()
    long["_r"] = [rank_row[tuple(r)] for r in long[ROW_KEYS].itertuples(index=False)]
    long["_c"] = [rank_col[tuple(c)] for c in long[COL_KEYS].itertuples(index=False)]
    long = long.sort_values(["_r", "_c"])[LONG_COLUMNS].reset_index(drop=True)
    long["best"] = long["best"].astype(bool)
    return long


def render_csv(table: Table) -> str:
    return long_form(table).to_csv(index=False)


def render_json(table: Table) -> str:
    def clean(v):
        if isinstance(v, (np.floating, float)):
            return None if not math.isfinite(float(v)) else float(v)
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return v

    cells = [{k: clean(v) for k, v in rec.items()} for rec in long_form(table).to_dict(orient="records")]
    for c in cells:
        c["n"] = None if c["n"] is None else int(c["n"])
    return json.dumps({"metric": table.metric, "title": table.title, "cells": cells, "notes": table.notes}, indent=1)


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv, "json": render_json}


def build_table(records: list[dict], metric: str = "auc", protocol: str | None = None, fmt: str = "markdown", *,
                fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
                methods: str | Sequence[str] | None = None, delta_to: str | None = None, test: str = "bootstrap",
                ci: bool = False, prompt_set: str | None = None, reference: str | Path | None = None) -> str:
    """The table of `metric` over `records` as text in `fmt` (markdown, latex, csv, json)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    table = aggregate(records, metric, protocol, fraction=fraction, datasets=datasets, methods=methods,
                      delta_to=delta_to, test=test, ci=ci, prompt_set=prompt_set, reference=reference)
    return RENDERERS[fmt](table)
