"""`bench report`: the results folder as one self-contained HTML page, readable offline.

Per protocol (in the registry's order) and label fraction: the table `bench table` prints for the same options,
rendered from the same aggregation (`bench.report.table.aggregate`), with each cell's numbers in `data-*`
attributes and each table's `bench table --format json` output in a JSON block beside it; the protocol's
figures (`bench.report.plots.write_plots`, drawn into a temporary folder) as PNG data URIs; each sweep study's
best.json, trials.csv and plots; and every record's provenance in a closed `<details>` element.

Nothing on the page is fetched: styles are inline, images are data URIs, there is no script to run, and a
Content-Security-Policy forbids any load but those data URIs.
"""
from __future__ import annotations

import base64
import html
import json
import shlex
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from bench.core.errors import UserError
from bench.core.registry import PROTOCOLS
from bench.report.cells import COL_KEYS, ROW_KEYS
from bench.report.render import MISSING, Table, cell_text, render_json
from bench.report.selection import fraction_label, metrics_present, parse_spec, protocol_rank

REPORT_NAME = "report.html"
# what a record says about where its number came from; its metrics are in the tables, its config is too long to
# show and is named by its hash
PROVENANCE_FIELDS = ("method", "ablation", "pretrain_hash", "pretrain_seed", "dataset", "protocol", "fraction",
                     "eval_seed", "eval_hash", "config_hash", "checkpoint", "git", "libraries", "device", "splits",
                     "cost", "contamination", "created_at", "wall_time_s", "suite", "sweep", "predictions_file")
CELL_NUMBERS = ("mean", "std", "n", "records", "ci_lo", "ci_hi", "delta", "delta_ci_lo", "delta_ci_hi", "p",
                "p_holm", "marker", "best", "kind", "contaminated")
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:0 1.2em 3em;
color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-top:1em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f4}td.num{white-space:nowrap}td.best{font-weight:bold}td.missing{color:#999}
tr.reference td{background:#f5f8ff}p.title{font-weight:600;margin:.4em 0}
ul.notes{font-size:.85em;color:#444}.figures{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;max-width:48%;min-width:320px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8em;color:#555}pre{background:#f6f6f8;padding:.6em;overflow-x:auto;font-size:.8em}
details{margin:.2em 0}summary{cursor:pointer}nav ul{columns:2}.muted{color:#666;font-size:.85em}
.scroll{overflow-x:auto}
"""
# only the page's own styles and data-URI images may load; anything else (a stray external link) is blocked
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class ReportTable:
    """One table of the page: the options `bench table` takes to print it, and the aggregated table."""

    metric: str
    protocol: str
    fraction: float
    datasets: list[str] | None
    delta_to: str | None
    ci: bool
    table: Table
    remark: str = ""  # what the page says about this table beyond `bench table`'s own notes

    def options(self) -> dict:
        """The `bench table` options that print this table (`--format json` gives the JSON beside it)."""
        return {"metric": self.metric, "protocol": self.protocol, "fraction": self.fraction,
                "datasets": ",".join(self.datasets) if self.datasets else None, "delta_to": self.delta_to,
                "ci": self.ci}

    def command(self, root: Path) -> str:
        """The `bench table` command line that prints this table from the records under `root`."""
        opts = self.options()
        words = ["bench table", f"--results-dir {shlex.quote(str(root))}", f"--metric {opts['metric']}",
                 f"--protocol {opts['protocol']}",
                 f"--fraction {opts['fraction']:g}"]
        words += [f"--datasets {opts['datasets']}"] * bool(opts["datasets"])
        words += [f"--delta-to {opts['delta_to']}"] * bool(opts["delta_to"]) + ["--ci"] * self.ci
        return " ".join(words)


def parse_metric_option(text: str) -> tuple[str | None, dict[str, str]]:
    """`--metric auc,segmentation=iou` -> ("auc", {"segmentation": "iou"}): an unqualified metric applies to every
    protocol whose records hold it; PROTOCOL=METRIC names one protocol's."""
    default, per_protocol = None, {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        protocol, sep, metric = item.rpartition("=")
        if not sep:
            if default is not None:
                raise UserError(f"--metric {text!r}: two metrics without a protocol ({default}, {item}); "
                                "qualify the others as PROTOCOL=METRIC")
            default = item
        elif not protocol or not metric:
            raise UserError(f"--metric {text!r}: malformed item {item!r}; expected METRIC or PROTOCOL=METRIC")
        else:
            PROTOCOLS.get(protocol)  # an unknown name is one line listing the protocols
            per_protocol[protocol] = metric
    return default, per_protocol


def protocol_metrics(records: list[dict], metric: str = "auc") -> dict[str, list[str]]:
    """Protocol -> the metrics its tables show, protocols in the registry's order: the one `metric` names for it,
    else its unqualified metric where its records hold it, else the protocol's headline metrics
    (`Protocol.headline_metrics`), else its records' first metric."""
    default, per_protocol = parse_metric_option(metric)
    protocols = sorted({r["protocol"] for r in records}, key=protocol_rank)
    absent = [p for p in per_protocol if p not in protocols]
    if absent:
        raise UserError(f"--metric names protocol(s) without records: {', '.join(absent)}; protocols present: "
                        f"{', '.join(protocols)}")
    out = {}
    for protocol in protocols:
        present = metrics_present([r for r in records if r["protocol"] == protocol])
        if protocol in per_protocol:
            if per_protocol[protocol] not in present:
                raise UserError(f"no {protocol} record has metric {per_protocol[protocol]!r}; metrics present: "
                                f"{', '.join(present)}")
            out[protocol] = [per_protocol[protocol]]
        elif default in present:
            out[protocol] = [default]
        else:
            registered = protocol in PROTOCOLS.names()
            headline = PROTOCOLS.get(protocol).headline_metrics(present) if registered else []
            out[protocol] = headline or present[:1]
    return out


def build_tables(records: list[dict], metric: str = "auc", delta_to: str | None = None,
                 ci: bool = False) -> list[ReportTable]:
    """Every table of the page: per protocol, per label fraction (the largest first), per metric it shows; a
    table's columns are the datasets whose records hold its metric. `delta_to` applies where its row has records
    (a method not evaluated with a protocol has no reference row there)."""
    from bench.report.table import aggregate

    if delta_to and not _has_row(records, delta_to):
        rows = sorted({f"{r['method']}:{r['ablation']}" for r in records})
        raise UserError(f"--delta-to {delta_to}: no records of that row; rows: {', '.join(rows)}")
    tables = []
    for protocol, metrics in protocol_metrics(records, metric).items():
        mine = [r for r in records if r["protocol"] == protocol]
        for fraction in sorted({float(r["fraction"]) for r in mine}, reverse=True):
            at = [r for r in mine if float(r["fraction"]) == fraction]
            for name in metrics:
                holding = sorted({r["dataset"] for r in at if name in (r.get("metrics") or {})})
                if not holding:
                    continue
                every = sorted({r["dataset"] for r in at})
                datasets = holding if holding != every else None
                reference = delta_to if delta_to and _has_row([r for r in at if r["dataset"] in holding],
                                                              delta_to) else None
                table = aggregate(records, name, protocol, fraction=fraction, datasets=datasets,
                                  delta_to=reference, ci=ci)
                remark = (f"--delta-to {delta_to}: that row has no {protocol} records at {fraction_label(fraction)} "
                          "labels, so no changes are shown here" if delta_to and reference is None else "")
                tables.append(ReportTable(name, protocol, fraction, datasets, reference, ci, table, remark))
    return tables


def _has_row(records: list[dict], spec: str) -> bool:
    method, ablation, _ = parse_spec(spec)
    return any(r["method"] == method and ablation in (None, r["ablation"]) for r in records)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _json_block(obj, css_class: str) -> str:
    """JSON inside `<script type="application/json">`: `<`, `>` and `&` as \\u escapes, so no text of it can
    close the element or read as markup, and `JSON.parse` still gives the object back."""
    text = json.dumps(obj, indent=1).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" class="{css_class}">{text}</script>'


def _data_value(value) -> str:
    """A number as `data-*` text that parses back to the same float (repr round-trips); '' for none."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def render_table(item: ReportTable, anchor: str, root: Path) -> str:
    """The table as HTML (cells as `bench table` writes them, best in bold) with its JSON form beside it."""
    table = item.table
    doc = json.loads(render_json(table))
    cells = {tuple(c[k] for k in ROW_KEYS + COL_KEYS): c for c in doc["cells"]}
    index = {(tuple(r[ROW_KEYS]), tuple(r[COL_KEYS])): r for _, r in table.long.iterrows()}
    show_variant = any(r[2] for r in table.rows)
    head = ["method", "ablation", *(["variant"] if show_variant else []),
            *[table.column_labels[c] for c in table.columns]]
    lines = [*([f'<p class="remark">{_esc(item.remark)}</p>'] if item.remark else []),
             f'<p class="title">{_esc(table.title)}</p>',
             (f'<div class="scroll"><table id="{anchor}" class="results" '
              f'data-options="{_esc(json.dumps(item.options()))}">'),
             "<thead><tr>" + "".join(f'<th scope="col">{_esc(h)}</th>' for h in head) + "</tr></thead><tbody>"]
    for row in table.rows:
        reference = table.reference is not None and tuple(row) == tuple(table.reference)
        out = [f'<th scope="row">{_esc(row[0])}</th>', f"<td>{_esc(row[1])}</td>",
               *([f"<td>{_esc(row[2])}</td>"] if show_variant else [])]
        for col in table.columns:
            cell, numbers = index.get((row, col)), cells.get((*row, *col), {})
            text = cell_text(cell, table.ci)
            classes = ["num", *(["best"] * bool(numbers.get("best"))), *(["missing"] * (text == MISSING))]
            attrs = {"method": row[0], "ablation": row[1], "variant": row[2], "dataset": col[0],
                     "protocol": col[1], "fraction": _data_value(col[2]),
                     **{k.replace("_", "-"): _data_value(numbers.get(k)) for k in CELL_NUMBERS}}
            data = " ".join(f'data-{k}="{_esc(v)}"' for k, v in attrs.items())
            shown = f"<strong>{_esc(text)}</strong>" if numbers.get("best") else _esc(text)
            out.append(f'<td class="{" ".join(classes)}" {data}>{shown}</td>')
        lines.append(("<tr class=\"reference\">" if reference else "<tr>") + "".join(out) + "</tr>")
    lines.append("</tbody></table></div>")
    lines.append(f'<p class="muted">the same table: <code>{_esc(item.command(root))} --format json</code></p>')
    lines.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in table.notes) + "</ul>")
    lines.append(_json_block({"options": item.options(), "table": doc}, "table-json"))
    return "\n".join(lines)


def _png(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def protocol_figures(records: list[dict], protocol: str, metrics: list[str], folder: Path) -> list[Path]:
    """The protocol's PNGs: bars and label-efficiency curves of each metric, ROC curves and mask panels, each
    where its records have something to draw."""
    from bench.report.plots import write_plots

    mine = [r for r in records if r["protocol"] == protocol]
    jobs = [(kind, m) for m in metrics for kind in ("bars", "fractions")] + [("roc", "auc"), ("masks", "auc")]
    written: list[Path] = []
    for kind, metric in jobs:
        try:
            written += write_plots(mine, kind, folder, metric=metric, protocol=protocol)
        except UserError:
            continue  # nothing of that kind to draw here (one label fraction, no predictions, no masks)
    return [p for p in written if p.suffix == ".png"]


def _frame_table(frame: pd.DataFrame) -> str:
    head = "".join(f'<th scope="col">{_esc(c)}</th>' for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return (f'<div class="scroll"><table class="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f'</table></div>')


def render_sweeps(root: Path) -> str:
    """Each study under `<root>/sweeps/`: best.json, trials.csv as a table (its text as written) and its plots."""
    studies = sorted(p for p in (root / "sweeps").glob("*/") if p.is_dir())
    if not studies:
        return '<p class="muted">no sweeps in this results folder</p>'
    parts = []
    for study in studies:
        parts.append(f'<h3 id="sweep-{_esc(study.name)}">{_esc(study.name)}</h3>')
        best = study / "best.json"
        try:
            parts.append(f"<pre>{_esc(json.dumps(json.loads(best.read_text()), indent=1))}</pre>")
        except (OSError, json.JSONDecodeError) as exc:
            parts.append(f'<p class="muted">best.json: not readable ({_esc(exc)})</p>')
        trials = study / "trials.csv"
        try:
            parts.append(_frame_table(pd.read_csv(trials, dtype=str, keep_default_na=False)))
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            parts.append(f'<p class="muted">trials.csv: not readable ({_esc(exc)})</p>')
        parts.append('<div class="figures">' + "".join(_png(p, f"{study.name}: {p.stem}")
                                                       for p in sorted(study.glob("*.png"))) + "</div>")
    return "\n".join(parts)


def _record_order(record: dict) -> tuple:
    return (protocol_rank(record["protocol"]), record["method"], record["ablation"], record["dataset"],
            -float(record["fraction"]), record.get("pretrain_seed") or 0, record.get("eval_seed") or 0)


def render_provenance(records: list[dict], root: Path) -> str:
    """One closed `<details>` per record: what it is in the summary, where it came from as JSON inside."""
    parts = []
    for r in sorted(records, key=_record_order):
        facts = {k: r[k] for k in PROVENANCE_FIELDS if k in r}
        path = Path(r["record_path"])
        facts["record"] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        git = r.get("git") or {}
        summary = (f"{r['method']}:{r['ablation']} · {r['dataset']} · {r['protocol']} · "
                   f"{fraction_label(float(r['fraction']))} · seed {r.get('pretrain_seed')} / eval seed "
                   f"{r.get('eval_seed')} · {r.get('created_at', 'time unknown')}"
                   + (f" · {str(git.get('commit'))[:10]}{' dirty' * bool(git.get('dirty'))}" if git else ""))
        parts.append(f'<details class="provenance"><summary>{_esc(summary)}</summary>'
                     f"<pre>{_esc(json.dumps(facts, indent=1, sort_keys=True, default=str))}</pre></details>")
    return "\n".join(parts)


def build_report(records: list[dict], root: str | Path, metric: str = "auc", delta_to: str | None = None,
                 ci: bool = False) -> str:
    """The whole page as HTML text (see the module docstring)."""
    if not records:
        raise UserError(f"no results records under {root}; run `bench run --method clip` first or pass "
                        "--results-dir")
    root = Path(root).expanduser().resolve()
    tables = build_tables(records, metric, delta_to, ci)
    metrics = protocol_metrics(records, metric)
    commits = sorted({f"{str(g.get('commit'))[:10]}{' (dirty)' * bool(g.get('dirty'))}"
                      for g in (r.get("git") for r in records) if g})
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    nav = ["<li><a href=\"#tables\">Tables</a><ul>"
           + "".join(f'<li><a href="#protocol-{_esc(p)}">{_esc(p)}</a></li>' for p in metrics) + "</ul></li>",
           '<li><a href="#sweeps">Sweeps</a></li>', '<li><a href="#provenance">Provenance</a></li>']
    body = [(f"<h1>medvlp-bench report</h1><p>{len(records)} records in <code>{_esc(root)}</code>; written {when}"
             f"{'; code ' + _esc(', '.join(commits)) if commits else ''}. Every table below is the one "
             "<code>bench table</code> prints with the options named under it.</p>"),
            f"<nav><ul>{''.join(nav)}</ul></nav>", '<section id="tables"><h2>Tables and figures</h2>']
    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        for number, protocol in enumerate(metrics):
            body.append(f'<section id="protocol-{_esc(protocol)}"><h2>{_esc(protocol)}</h2>')
            for i, item in enumerate(t for t in tables if t.protocol == protocol):
                body.append(f"<h3>{_esc(item.metric)}, {fraction_label(item.fraction)} labels</h3>")
                body.append(render_table(item, f"table-{number}-{i}", root))
            figures = protocol_figures(records, protocol, metrics[protocol], Path(scratch) / str(number))
            body.append('<div class="figures">' + "".join(_png(p, f"{protocol}: {p.stem}") for p in figures)
                        + "</div>")
            body.append("</section>")
    body.append("</section>")
    body.append(f'<section id="sweeps"><h2>Sweeps</h2>{render_sweeps(root)}</section>')
    body.append('<section id="provenance"><h2>Provenance</h2><p class="muted">one entry per record; open one to '
                f"see where its numbers came from</p>{render_provenance(records, root)}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>medvlp-bench report: {_esc(root.name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(root: str | Path, out: str | Path | None = None, metric: str = "auc", delta_to: str | None = None,
                 ci: bool = False) -> Path:
    """Write the report of the records under `root` to `out` (default `<root>/report.html`); its path."""
    from bench.core.io import atomic_write_text
    from bench.core.results import ResultsStore

    root = Path(root).expanduser()
    page = build_report(ResultsStore(root).records(), root, metric, delta_to, ci)
    target = Path(out).expanduser() if out else root / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(target, page)
