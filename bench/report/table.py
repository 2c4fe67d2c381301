"""`bench table`: results records -> a table a paper can print.

Three layers, each a plain function in its module:
  selection   `select_records` (filters) and `load_frame`: records -> a tidy frame, one row per record, with
              the metric's value, its stored bootstrap replicates and the identity of its test set;
  cells       `summarise`, `mark_best`, `add_deltas` (and `references.quoted_cells`): the frame -> the long
              form, one row per (table row, table column) with mean, std, n, CI, best, delta, p, Holm-adjusted
              p, marker;
  render      markdown (github), latex (booktabs), csv and json (both the long form).
This module (`aggregate`, `build_table`) puts them together.

Rows are (method, ablation[, variant]): several configurations (pretrain hashes, or eval-settings hashes within
one cell) are never pooled. Columns are datasets (x protocol x label fraction when several are present).
Quoted (published) numbers are extra rows that never mix with measured ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.core.errors import UserError
from bench.core.results import RANDOM_INIT
from bench.report.cells import (COL_KEYS, ROW_KEYS, add_deltas, complete_grid, mark_best, resolve_reference, row_name,
                                stats_module, summarise)
from bench.report.references import load_reference, quoted_cells
from bench.report.render import FORMATS, RENDERERS, Table
from bench.report.selection import fraction_label, name_list, parse_spec, protocol_rank, selected_frame

TESTS = ("bootstrap", "delong")


def _marker_legend() -> str:
    mark = stats_module().significance_marker
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
              ci: bool = False, prompt_set: str | None = None, reference: str | Path | None = None,
              cost: bool = False) -> Table:
    """Filters, loads, summarises, marks the best, adds deltas and quoted rows: everything but rendering. With
    `cost`, every row also shows what its models cost to train (`cost_columns`)."""
    if test not in TESTS:
        raise UserError(f"unknown test {test!r}; valid tests: {', '.join(TESTS)}")
    notes: list[str] = []
    frame = selected_frame(records, metric, protocol, fraction=fraction, datasets=datasets, methods=methods,
                           prompt_set=prompt_set, notes=notes)
    present = frame.attrs["metrics_present"]
    long = summarise(frame, ci=ci)
    ref_row = resolve_reference(long, delta_to) if delta_to else None

    columns = sorted({tuple(c) for c in long[COL_KEYS].itertuples(index=False)},
                     key=lambda c: (_order(name_list(datasets), c[0]), *protocol_rank(c[1]), c[2]))
    if reference is not None:
        quoted, outside = quoted_cells(load_reference(reference), metric, columns)
        if outside:
            notes.append(f"{outside} quoted {metric} value(s) in {Path(reference).name} are outside this table's "
                         "columns and not shown")
        if len(quoted):
            long = pd.concat([long, quoted.reindex(columns=long.columns)], ignore_index=True)
            for col in ("marker", "test", "note", "source", "prompt_set", "eval_hash", "ablation", "variant"):
                long[col] = long[col].fillna("")
            long["contaminated"] = long["contaminated"].astype("boolean").fillna(False).astype(bool)
    long = mark_best(complete_grid(long, columns))
    long["metric"] = metric
    if ref_row is not None:
        long = add_deltas(long, frame, ref_row, test, metric)

    protocols = sorted({c[1] for c in columns}, key=protocol_rank)
    fractions = sorted({c[2] for c in columns})
    labels = {c: " ".join([c[0], *([c[1]] if len(protocols) > 1 else []),
                           *([fraction_label(c[2])] if len(fractions) > 1 else [])]) for c in columns}
    rows = _row_order(long, name_list(methods), ref_row)

    scope = ", ".join([*([protocols[0]] if len(protocols) == 1 else []),
                       *([f"{fraction_label(fractions[0])} labels"] if len(fractions) == 1 else [])])
    conf = frame["confidence"].iloc[0] if len(frame) else 0.95
    what = "mean±std over seeds (n = records with a value)"
    if ci:
        what += f" [{conf:.0%} CI of the mean: seeds and test resamples, two-level bootstrap]"
    if ref_row is not None:
        what = (f"change from {row_name(*ref_row[:2])}{' ' + ref_row[2] if ref_row[2] else ''} (its row: absolute "
                f"{what}); other rows: Δ mean{', Δ CI' if ci and test == 'bootstrap' else ''} and significance marker")
    title = f"{metric.upper()}{' (' + scope + ')' if scope else ''}: {what}; bold = best per column"

    if ref_row is not None:
        delong = test == "delong" and metric == "auc"
        if test == "delong" and not delong:
            notes.append(f"DeLong applies to AUC only; {metric} is compared with the paired bootstrap")
        notes.append(
            ("Test: DeLong on the macro AUC of one record per side (paired, same test samples); Δ is DeLong's, "
             "over the classes with at least 2 positives and 2 negatives in the test split." if delong else
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
        notes.append(f"{row_name(r['method'], r['ablation'])}{' ' + r['variant'] if r['variant'] else ''}, "
                     f"{labels[tuple(r[COL_KEYS])]}: {r['note']}")
    notes.extend(rare_class_notes(frame))
    notes.extend(contamination_notes(frame))
    notes.append(f"metrics in these records: {', '.join(present)}")
    table = Table(metric, long, rows, columns, labels, title, notes, ci, ref_row)
    if cost:
        table.extra_columns, table.extra = cost_columns(frame, rows)
        notes.append("cost: optimiser steps, samples seen of each kind (paired / image-only / text-only), model GFLOPs "
                     "of one optimiser step (counted on the first batch) and in all, of the pretraining behind each "
                     "row; a range where its records differ, ? where a record does not say")
    return table


def contamination_notes(frame: pd.DataFrame) -> list[str]:
    """One note per (row, dataset) whose model saw the dataset's data in pretraining (cells marked †)."""
    seen: dict[tuple[str, str], set[str]] = {}
    for method, ablation, dataset, found in zip(frame["method"], frame["ablation"], frame["dataset"],
                                               frame["contamination"]):
        for f in found or []:
            what = f"{f['kind']} source {f['source']}: {', '.join(f['how'])}"
            counts = [f"{f[k]} {k}" for k in ("patients", "images") if f.get(k)]
            seen.setdefault((row_name(method, ablation), dataset), set()).add(
                what + (f" ({', '.join(counts)})" if counts else ""))
    return [f"† {row} saw {dataset}'s data in pretraining ({'; '.join(sorted(how))}): not a clean {dataset} result"
            for (row, dataset), how in seen.items()]


COST_COLUMNS = ["steps", "paired seen", "image-only seen", "text-only seen", "GFLOP/step", "GFLOP"]


def cost_columns(frame: pd.DataFrame, rows: list[tuple]) -> tuple[list[str], dict[tuple, list[str]]]:
    """(COST_COLUMNS, row -> its values), from the `cost` of the row's records."""
    values: dict[tuple, list[dict | None]] = {}
    for row, cost in zip(frame[ROW_KEYS].itertuples(index=False), frame["cost"]):
        values.setdefault(tuple(row), []).append(cost)

    def shown(costs: list[dict | None], get) -> str:
        got = [None if c is None else get(c) for c in costs]
        if any(v is None for v in got):
            return "?"
        low, high = min(got), max(got)
        text = (lambda v: f"{v / 1e9:.3g}") if isinstance(get, _Gflop) else (lambda v: f"{int(v):,}")
        return text(low) if low == high else f"{text(low)}-{text(high)}"

    getters = [lambda c: c["optimizer_steps"], *[lambda c, k=k: c["samples"].get(k, 0)
                                                for k in ("paired", "image_only", "text_only")],
               _Gflop("flops_per_step"), _Gflop("flops")]
    return COST_COLUMNS, {row: [shown(values[row], g) for g in getters] for row in rows if row in values}


class _Gflop:
    """Reads a FLOP count of a cost record (None where it was not counted)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, cost: dict) -> float | None:
        return cost.get(self.key)


def rare_class_notes(frame: pd.DataFrame) -> list[str]:
    """One note per dataset whose records flag classes with few positives or negatives in the test split."""
    counts: dict[str, dict[str, set[tuple[int, int]]]] = {}
    for dataset, rare in zip(frame["dataset"], frame["rare_classes"]):
        for label, n in rare.items():
            counts.setdefault(dataset, {}).setdefault(label, set()).add((n["positives"], n["negatives"]))
    return [f"{dataset}: few test samples of {', '.join(f'{label} ({_counts(seen)})' for label, seen in rare.items())}"
            f" (fewer than {stats_module().RARE_CLASS_COUNT} positives or negatives): their per-class values rest on "
            "a handful of samples, and the macro AUC's CI on the resamples that draw every class"
            for dataset, rare in counts.items()]


def _counts(seen: set[tuple[int, int]]) -> str:
    """'2 positives' (or negatives, whichever is rare), or the range where records disagree."""
    index, word = (0, "positives") if min(p for p, _ in seen) <= min(n for _, n in seen) else (1, "negatives")
    values = sorted({s[index] for s in seen})
    return f"{values[0]} {word}" if len(values) == 1 else f"{values[0]}-{values[-1]} {word}"


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


def build_table(records: list[dict], metric: str = "auc", protocol: str | None = None, fmt: str = "markdown", *,
                fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
                methods: str | Sequence[str] | None = None, delta_to: str | None = None, test: str = "bootstrap",
                ci: bool = False, prompt_set: str | None = None, reference: str | Path | None = None,
                cost: bool = False) -> str:
    """The table of `metric` over `records` as text in `fmt` (markdown, latex, csv, json)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    table = aggregate(records, metric, protocol, fraction=fraction, datasets=datasets, methods=methods,
                      delta_to=delta_to, test=test, ci=ci, prompt_set=prompt_set, reference=reference, cost=cost)
    return RENDERERS[fmt](table)
