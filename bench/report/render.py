"""A table as text: markdown (github), latex (booktabs), csv and json (both the long form)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tabulate import tabulate

from bench.report.cells import LONG_COLUMNS
from bench.report.selection import COL_KEYS, ROW_KEYS

FORMATS = ("markdown", "latex", "csv", "json")
MISSING = "missing"
CONTAMINATED = " †"  # the model saw this dataset's data in pretraining (bench.experiment.contamination)


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
    extra_columns: list[str] = field(default_factory=list)  # per-row columns after the cells (e.g. --cost)
    extra: dict[tuple, list[str]] = field(default_factory=dict)  # row -> its values of extra_columns


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _value_text(cell: pd.Series | None, ci: bool = False) -> str:
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


def cell_text(cell: pd.Series | None, ci: bool = False) -> str:
    """`_value_text`, with † where the cell's model saw the dataset's data in pretraining."""
    text = _value_text(cell, ci)
    return text + CONTAMINATED if cell is not None and text != MISSING and bool(cell.get("contaminated")) else text


def _grid(table: Table, bold: tuple[str, str], escape=lambda s: s) -> tuple[list[str], list[list[str]]]:
    index = {(tuple(r[ROW_KEYS]), tuple(r[COL_KEYS])): r for _, r in table.long.iterrows()}
    show_variant = any(r[2] for r in table.rows)
    header = ["method", "ablation", *(["variant"] if show_variant else []),
              *[table.column_labels[c] for c in table.columns], *table.extra_columns]
    body = []
    for row in table.rows:
        cells = []
        for c in table.columns:
            cell = index.get((row, c))
            text = escape(cell_text(cell, table.ci))
            cells.append(f"{bold[0]}{text}{bold[1]}" if cell is not None and bool(cell["best"]) else text)
        extra = [escape(v) for v in table.extra.get(row, [""] * len(table.extra_columns))]
        body.append([escape(row[0]), escape(row[1]), *([escape(row[2])] if show_variant else []), *cells, *extra])
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
    out = {"metric": table.metric, "title": table.title, "cells": cells, "notes": table.notes}
    if table.extra_columns:  # per-row columns (--cost): {"method", "ablation", "variant", column: value}
        out["rows"] = [{**dict(zip(ROW_KEYS, row)), **dict(zip(table.extra_columns, values))}
                       for row, values in table.extra.items()]
    return json.dumps(out, indent=1)


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "csv": render_csv, "json": render_json}
