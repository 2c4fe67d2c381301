"""`bench plot`: figures from the results records, as PNG and PDF (matplotlib, no display needed).

  bars       per (protocol, fraction): one panel per dataset, a bar per row (method/ablation) at the seed mean,
             whiskers = the CI of the mean (two-level bootstrap over the records' replicates; a single record's
             stored CI; none if neither), n in the label;
  fractions  label-efficiency curves: the metric vs label fraction (log axis) per row, one figure per dataset
             with a panel per protocol that has several fractions, CI bands where CIs exist;
  roc        per (dataset, protocol, fraction): one macro-average ROC curve per row from the stored predictions;
  masks      per segmentation (dataset, fraction): a panel of test images (those with the largest true masks),
             the true mask's outline over each and every row's predicted mask, from the stored predictions.

The plotted numbers come from `bar_data`, `fraction_data`, `roc_data` and `mask_panel_data`, which the figures
only draw.
Rows, filters and "never pool configurations" are the table's (`bench.report.selection`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.report.cells import summarise
from bench.report.selection import (assign_variants, fraction_label, load_frame, protocol_rank, row_label,
                                    select_records, selected_frame)

KINDS = ("bars", "fractions", "roc", "masks", "all")
MASK_PANEL_IMAGES = 4
ROC_GRID = np.linspace(0.0, 1.0, 201)


def _row_key(method: str, ablation: str, variant: str) -> tuple:
    return (method == "random-init", method, ablation != "none", ablation, variant)


def _order(cells: pd.DataFrame) -> pd.DataFrame:
    """Rows in the table's order: methods by name, ablation `none` first, random-init last."""
    cells = cells.copy()
    cells["row"] = [row_label(m, a, v) for m, a, v in zip(cells["method"], cells["ablation"], cells["variant"])]
    cells["_key"] = [_row_key(m, a, v) for m, a, v in zip(cells["method"], cells["ablation"], cells["variant"])]
    cells["_p"] = cells["protocol"].map(lambda p: protocol_rank(p)[0])
    return cells.sort_values(["_p", "protocol", "fraction", "dataset", "_key"]).drop(columns=["_key", "_p"])


def bar_data(records: list[dict], metric: str = "auc", protocol: str | None = None,
             fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
             methods: str | Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (table row, dataset, protocol, fraction) with a value: row, mean, n, lo, hi (NaN: no whisker)."""
    frame = selected_frame(records, metric, protocol, fraction=fraction, datasets=datasets, methods=methods)
    cells = summarise(frame, ci=True)
    cells = cells[cells["n"] > 0].rename(columns={"ci_lo": "lo", "ci_hi": "hi"})
    return _order(cells)[["row", "method", "ablation", "variant", "dataset", "protocol", "fraction", "mean", "std",
                          "n", "lo", "hi"]].reset_index(drop=True)


def fraction_data(records: list[dict], metric: str = "auc", protocol: str | None = None,
                  datasets: str | Sequence[str] | None = None,
                  methods: str | Sequence[str] | None = None) -> pd.DataFrame:
    """`bar_data` restricted to the (dataset, protocol) pairs with several label fractions."""
    data = bar_data(records, metric, protocol, None, datasets, methods)
    several = data.groupby(["dataset", "protocol"])["fraction"].transform("nunique") > 1
    if not several.any():
        present = ", ".join(f"{d} {p}: {', '.join(fraction_label(f) for f in sorted(g['fraction'].unique()))}"
                            for (d, p), g in data.groupby(["dataset", "protocol"]))
        raise UserError(f"no dataset/protocol has several label fractions to plot; fractions present: {present}")
    return data[several].reset_index(drop=True)


def _record_roc(path: Path) -> tuple[np.ndarray, float] | None:
    """Macro-average ROC of one predictions file on ROC_GRID (mean over the classes with both labels of the
    per-class TPR, interpolated), and the macro AUC (mean of per-class AUCs); None if no class has both."""
    from sklearn.metrics import auc, roc_curve

    pred = pd.read_csv(path)
    classes = [c[len("score/"):] for c in pred.columns if c.startswith("score/")]
    curves, aucs = [], []
    for c in classes:
        y, s = pred[f"true/{c}"].to_numpy(float), pred[f"score/{c}"].to_numpy(float)
        if len(np.unique(y)) != 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        curve = np.interp(ROC_GRID, fpr, tpr)
        curve[0] = 0.0  # the curve starts at (0, 0), not at the TPR reached at the first threshold
        curves.append(curve)
        aucs.append(auc(fpr, tpr))
    if not curves:
        return None
    return np.mean(curves, axis=0), float(np.mean(aucs))


def roc_data(records: list[dict], protocol: str | None = None, fraction: float | str | None = None,
             datasets: str | Sequence[str] | None = None,
             methods: str | Sequence[str] | None = None) -> dict[tuple, list[dict]]:
    """{(dataset, protocol, fraction): [{row, fpr, tpr, auc, n}, ...]}: per row, the vertical mean over its
    records of their macro-average ROC curves and the mean of their macro AUCs. Records without predictions
    are left out; a figure without any row is left out."""
    selected = select_records(records, protocol, fraction, datasets, methods)
    frame = assign_variants(load_frame(selected, "auc"))
    out: dict[tuple, list[dict]] = {}
    ordered = _order(frame.assign(row=""))
    for (dataset, proto, frac), g in ordered.groupby(["dataset", "protocol", "fraction"], sort=False):
        curves = []
        for (label, m, a, v), rows in g.groupby(["row", "method", "ablation", "variant"], sort=False):
            rocs = [_record_roc(Path(p)) for p in rows["predictions"] if p is not None and Path(p).exists()]
            rocs = [r for r in rocs if r is not None]
            if rocs:
                curves.append({"row": label, "fpr": ROC_GRID, "tpr": np.mean([r[0] for r in rocs], axis=0),
                               "auc": float(np.mean([r[1] for r in rocs])), "n": len(rocs),
                               "key": _row_key(m, a, v)})
        if curves:
            out[(dataset, proto, frac)] = curves
    if not out:
        raise UserError("no stored predictions for the selected records; ROC curves need the records' "
                        "predictions files (<stem>.predictions.csv.gz beside each record)")
    return out


def mask_panel_data(records: list[dict], fraction: float | str | None = None,
                    datasets: str | Sequence[str] | None = None, methods: str | Sequence[str] | None = None,
                    images: int = MASK_PANEL_IMAGES) -> dict[tuple, dict]:
    """{(dataset, fraction): {"images": [(sample id, image path, true RLE)], "size": mask side, "rows": [(row,
    [predicted RLE per image], that row's mask side)]}} for the segmentation records: the `images` test images
    with the largest true masks (then by id), and each row's first record (lowest pretraining and evaluation
    seed); rows of models with another input size keep their own mask side."""
    selected = select_records(records, "segmentation", fraction, datasets, methods)
    frame = _order(assign_variants(load_frame(selected, "dice")))
    out: dict[tuple, dict] = {}
    for (dataset, frac), g in frame.groupby(["dataset", "fraction"], sort=False):
        panel: dict = {"rows": []}
        for label, rows in g.groupby("row", sort=False):
            rows = rows.sort_values(["pretrain_seed", "eval_seed"])
            path = rows["predictions"].iloc[0]
            if path is None or not Path(path).exists():
                continue
            pred = pd.read_csv(path, dtype={"sample_id": str, "true_rle": str, "pred_rle": str}).set_index("sample_id")
            record = next(r for r in selected if r.get("record_path") == rows["record_path"].iloc[0])
            size = int(record["chosen"]["mask_size"])
            if "images" not in panel:
                chosen = pred.sort_values("true_pixels", ascending=False, kind="stable").head(images)
                panel["images"] = [(sid, r["image_path"], r["true_rle"]) for sid, r in chosen.iterrows()]
                panel["size"] = size
            panel["rows"].append((label, [pred.at[sid, "pred_rle"] if sid in pred.index else "-1"
                                          for sid, _, _ in panel["images"]], size))
        if panel["rows"]:
            out[(dataset, frac)] = panel
    if not out:
        raise UserError("no segmentation records with stored predictions to draw masks from")
    return out


# ------------------------------------------------------------------------------------------------ drawing

def _figure(ncols: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, 5.0), height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def row_colors(rows) -> dict[str, str]:
    """One colour per row label, the same in every panel and figure; random-init rows grey."""
    colors, i = {}, 0
    for r in dict.fromkeys(rows):
        if r.startswith("random-init"):
            colors[r] = "0.55"
        else:
            colors[r], i = f"C{i % 10}", i + 1
    return colors


def _frac_tag(f: float) -> str:
    return f"f{f:g}"


def figure_bars(data: pd.DataFrame, metric: str, title: str, colors: dict[str, str] | None = None):
    """One panel per dataset of `data` (one protocol and fraction): bars at the mean, CI whiskers where known."""
    names = list(dict.fromkeys(data["dataset"]))
    colors = colors or row_colors(data["row"])
    fig, axes = _figure(len(names), width=max(2.8, 0.9 * data.groupby("dataset").size().max() + 1.2))
    values = np.r_[data["mean"].to_numpy(float), data["lo"].to_numpy(float), data["hi"].to_numpy(float)]
    floor = max(0.0, math.floor((np.nanmin(values) - 0.05) * 10) / 10)
    top = np.nanmax(values) + 0.02
    for ax, name in zip(axes, names):
        d = data[data["dataset"] == name]
        x = np.arange(len(d))
        ax.bar(x, d["mean"], color=[colors[r] for r in d["row"]])
        has = np.isfinite(d["lo"].to_numpy(float)) & np.isfinite(d["hi"].to_numpy(float))
        if has.any():
            mean = d["mean"].to_numpy(float)[has]
            err = np.vstack([mean - d["lo"].to_numpy(float)[has], d["hi"].to_numpy(float)[has] - mean])
            ax.errorbar(x[has], mean, yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=3, lw=1)
        ax.set_xticks(x, [f"{r}\n(n={n})" for r, n in zip(d["row"], d["n"])], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(floor, top)  # one scale for every panel
        ax.set_title(name)
        ax.set_ylabel(metric.upper())
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return fig


def figure_fractions(data: pd.DataFrame, metric: str, dataset: str, colors: dict[str, str] | None = None):
    """One panel per protocol of `data` (one dataset): the metric vs label fraction per row, CI bands."""
    protocols = list(dict.fromkeys(data["protocol"]))
    colors = colors or row_colors(data["row"])
    fig, axes = _figure(len(protocols), width=5.0, height=4.0)
    for ax, proto in zip(axes, protocols):
        d = data[data["protocol"] == proto]
        for row, g in d.groupby("row", sort=False):
            g = g.sort_values("fraction")
            x = g["fraction"].to_numpy(float) * 100
            color = colors[row]
            ax.plot(x, g["mean"], marker="o", color=color,
                    label=f"{row} (n={int(g['n'].min())}" + (f"-{int(g['n'].max())})" if g["n"].nunique() > 1
                                                              else ")"))
            lo, hi = g["lo"].to_numpy(float), g["hi"].to_numpy(float)
            if np.isfinite(lo).any() and len(g) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
            elif np.isfinite(lo).any():  # a single fraction has no band: a whisker instead
                mean = g["mean"].to_numpy(float)
                ax.errorbar(x, mean, yerr=np.clip([mean - lo, hi - mean], 0, None), fmt="none", ecolor=color,
                            capsize=3, lw=1)
        ax.set_xscale("log")
        ax.set_xticks([1, 10, 100], ["1%", "10%", "100%"])
        ax.set_xlabel("labelled training data")
        ax.set_ylabel(metric.upper())
        ax.set_title(f"{dataset} {proto}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{metric.upper()} vs label fraction: seed mean\nband = CI of the mean (where replicates exist)",
                 fontsize=9)
    return fig


def figure_roc(curves: list[dict], dataset: str, protocol: str, fraction: float,
               colors: dict[str, str] | None = None):
    colors = colors or row_colors(c["row"] for c in curves)
    fig, (ax,) = _figure(1, width=5.0, height=4.6)
    for c in curves:
        ax.plot(c["fpr"], c["tpr"], color=colors[c["row"]],
                label=f"{c['row']} (AUC {c['auc']:.3f}, n={c['n']})")
    ax.plot([0, 1], [0, 1], ls="--", color="0.7", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{dataset} {protocol} {fraction_label(fraction)} labels\nmacro-average ROC (one-vs-rest per class), "
                 "mean over seeds; AUC = mean macro AUC", fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------ writing

def write_plots(records: list[dict], kind: str, out_dir: str | Path, metric: str = "auc",
                protocol: str | None = None, fraction: float | str | None = None,
                datasets: str | Sequence[str] | None = None,
                methods: str | Sequence[str] | None = None) -> list[Path]:
    """Write the figures of `kind` (bars, fractions, roc, masks, all) as PNG and PDF under `out_dir`; the paths.
    `all` writes what there is to draw and skips a kind with nothing to draw (unless none has anything)."""
    if kind not in KINDS:
        raise UserError(f"unknown plot kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    out_dir = Path(out_dir).expanduser()
    written: list[Path] = []
    kinds = ["bars", "fractions", "roc", "masks"] if kind == "all" else [kind]
    errors = []
    for k in kinds:
        try:
            if k == "bars":
                written += _write_bars(records, out_dir, metric, protocol, fraction, datasets, methods)
            elif k == "fractions":
                written += _write_fractions(records, out_dir, metric, protocol, datasets, methods)
            elif k == "masks":
                written += _write_masks(records, out_dir, fraction, datasets, methods)
            else:
                written += _write_roc(records, out_dir, protocol, fraction, datasets, methods)
        except UserError as exc:
            if kind != "all":
                raise
            errors.append(f"{k}: {exc}")
    if not written:
        raise UserError("nothing to plot: " + "; ".join(errors))
    return written


def _write_bars(records, out_dir, metric, protocol, fraction, datasets, methods) -> list[Path]:
    data = bar_data(records, metric, protocol, fraction, datasets, methods)
    colors = row_colors(data["row"])
    paths = []
    for (proto, frac), d in data.groupby(["protocol", "fraction"], sort=False):
        title = (f"{metric.upper()}, {proto}, {fraction_label(frac)} labels: seed mean, whiskers = "
                 "CI of the mean (seeds x test resamples; one record: its bootstrap CI)")
        fig = figure_bars(d, metric, title, colors)
        paths += _save(fig, out_dir, f"bars_{metric}_{proto}_{_frac_tag(frac)}")
    return paths


def _write_fractions(records, out_dir, metric, protocol, datasets, methods) -> list[Path]:
    data = fraction_data(records, metric, protocol, datasets, methods)
    colors = row_colors(data["row"])
    paths = []
    for dataset, d in data.groupby("dataset", sort=False):
        paths += _save(figure_fractions(d, metric, dataset, colors), out_dir, f"fractions_{metric}_{dataset}")
    return paths


def figure_masks(panel: dict, dataset: str, fraction: float):
    """A grid: one column per image, a row of images with the true mask outlined, then one row per model with
    its predicted mask filled over the image (true outline kept)."""
    from matplotlib.figure import Figure

    from bench.data.images import read_image, resize_and_pad
    from bench.data.rle import rle_decode

    size, shown = panel["size"], panel["images"]
    fig = Figure(figsize=(2.2 * len(shown), 2.3 * (len(panel["rows"]) + 1)), layout="constrained")
    axes = fig.subplots(len(panel["rows"]) + 1, len(shown), squeeze=False)
    pictures = []
    for sid, path, true_rle in shown:
        try:
            picture = resize_and_pad(read_image(path), size)
        except Exception:  # noqa: BLE001 - a moved or unreadable image: draw the masks on grey
            picture = np.full((size, size), 128, np.uint8)
        pictures.append((picture, rle_decode(true_rle, size, size)))
    for r, (label, predicted, own) in enumerate([("image, true mask", None, size), *panel["rows"]]):
        scaled = np.arange(size) * own // size  # a row of another input size: its masks resampled to the panel
        for c, ((picture, truth), (sid, _, _)) in enumerate(zip(pictures, shown)):
            ax = axes[r][c]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255)
            if predicted is not None:
                mask = rle_decode(predicted[c], own, own)[np.ix_(scaled, scaled)]
                ax.imshow(np.ma.masked_where(~mask, np.ones((size, size))),
                          cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            if truth.any():
                ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"…{str(sid)[-14:]}" if len(str(sid)) > 15 else str(sid), fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"{dataset} segmentation, {fraction_label(fraction)} labels: true mask outlined (green), "
                 f"predicted filled (red)", fontsize=9)
    return fig


def _write_masks(records, out_dir, fraction, datasets, methods) -> list[Path]:
    paths = []
    for (dataset, frac), panel in mask_panel_data(records, fraction, datasets, methods).items():
        paths += _save(figure_masks(panel, dataset, frac), out_dir, f"masks_{dataset}_{_frac_tag(frac)}")
    return paths


def _write_roc(records, out_dir, protocol, fraction, datasets, methods) -> list[Path]:
    data = roc_data(records, protocol, fraction, datasets, methods)
    colors = row_colors(r for _, r in sorted({(c["key"], c["row"]) for curves in data.values() for c in curves}))
    paths = []
    for (dataset, proto, frac), curves in data.items():
        fig = figure_roc(curves, dataset, proto, frac, colors)
        paths += _save(fig, out_dir, f"roc_{dataset}_{proto}_{_frac_tag(frac)}")
    return paths
