import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from test_table import _rec, _truth, _write

from bench.core.errors import UserError
from bench.core.results import ResultsStore
from bench.evaluation.stats import combined_ci
from bench.report.plots import bar_data, figure_bars, fraction_data, roc_data, write_plots


@pytest.fixture()
def store(tmp_path):
    """mmclip and clip at 1/10/100% labels (3 seeds at 100%, 1 below), a random-init baseline, real predictions."""
    store = ResultsStore(tmp_path / "results")
    y = _truth(160)
    for seed in range(3):
        _write(store, "mmclip", "none", seed, y, 1.2, resamples=100)
        _write(store, "clip", "none", seed, y, 0.8, resamples=100)
    _write(store, "random-init", "mmclip", 0, y, 0.0, phash="r" * 16, resamples=100)
    for frac, signal in ((0.1, 0.6), (0.01, 0.3)):
        _write(store, "mmclip", "none", 0, y, signal, fraction=frac, resamples=100)
        _write(store, "clip", "none", 0, y, signal / 2, fraction=frac, resamples=100)
    return store


def _nonempty(paths, stem):
    got = {p.name for p in paths}
    assert {f"{stem}.png", f"{stem}.pdf"} <= got, got
    for p in paths:
        if p.stem == stem:
            assert p.stat().st_size > 1000
    png = next(p for p in paths if p.name == f"{stem}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bars_have_ci_whiskers_where_cis_exist(store, tmp_path):
    records = store.records()
    data = bar_data(records, "auc", fraction=1.0)
    mm = data[data.row == "mmclip:none"].iloc[0]
    reps = [np.asarray(r["bootstrap"]["replicates"]["auc"]) for r in records
            if r["method"] == "mmclip" and r["fraction"] == 1.0]
    assert mm.n == 3 and (mm.lo, mm.hi) == pytest.approx(combined_ci(reps, 0.95, seed=0))
    assert mm.lo < mm["mean"] < mm.hi
    # a single record without replicates: its stored CI; without either: no whisker
    bare = [_rec("clip", "none", 0, "zero-shot", 0.7, bootstrap={"ci": {"auc": [0.6, 0.8]}}),
            _rec("mrm", "none", 0, "zero-shot", 0.6)]
    d = bar_data(bare).set_index("row")
    assert (d.loc["clip:none", "lo"], d.loc["clip:none", "hi"]) == (0.6, 0.8)
    assert np.isnan(d.loc["mrm:none", "lo"])
    fig = figure_bars(d.reset_index(), "auc", "t")
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 1  # one whisker: clip's

    paths = write_plots(records, "bars", tmp_path / "plots", fraction=1.0)
    _nonempty(paths, "bars_auc_linear-probe_f1")
    assert len(paths) == 2


def test_fraction_curves(store, tmp_path):
    data = fraction_data(store.records())
    assert sorted(data[data.row == "mmclip:none"].fraction) == [0.01, 0.1, 1.0]
    assert "random-init:mmclip" in set(data.row)  # present at 100% only, still drawn
    _nonempty(write_plots(store.records(), "fractions", tmp_path / "p"), "fractions_auc_chexpert")
    with pytest.raises(UserError, match="protocols present: linear-probe"):
        write_plots(store.records(), "fractions", tmp_path / "p", protocol="zero-shot")
    one = [r for r in store.records() if r["fraction"] == 1.0]
    with pytest.raises(UserError, match="fractions present: chexpert linear-probe: 100%"):
        write_plots(one, "fractions", tmp_path / "p")


def test_roc_curves_from_predictions(store, tmp_path):
    records = store.records()
    curves = roc_data(records, fraction=1.0)[("chexpert", "linear-probe", 1.0)]
    by_row = {c["row"]: c for c in curves}
    mm = [r["metrics"]["auc"] for r in records if r["method"] == "mmclip" and r["fraction"] == 1.0]
    assert by_row["mmclip:none"]["auc"] == pytest.approx(np.mean(mm)) and by_row["mmclip:none"]["n"] == 3
    assert by_row["mmclip:none"]["auc"] > by_row["random-init:mmclip"]["auc"]
    tpr = by_row["mmclip:none"]["tpr"]
    assert tpr[0] >= 0 and tpr[-1] == pytest.approx(1.0) and (np.diff(tpr) >= -1e-12).all()
    paths = write_plots(records, "roc", tmp_path / "p")
    for frac in ("f1", "f0.1", "f0.01"):
        _nonempty(paths, f"roc_chexpert_linear-probe_{frac}")
    with pytest.raises(UserError, match="no stored predictions"):
        write_plots([_rec("clip", "none", 0, "zero-shot", 0.7)], "roc", tmp_path / "p")


def test_nothing_to_plot_and_bad_kind_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="valid kinds"):
        write_plots([_rec("clip", "none", 0, "zero-shot", 0.7)], "pie", tmp_path)
    with pytest.raises(UserError, match="no results records"):
        write_plots([], "bars", tmp_path)
    with pytest.raises(UserError, match="metrics present: auc"):
        write_plots([_rec("clip", "none", 0, "zero-shot", 0.7)], "bars", tmp_path, metric="f1")


def test_cli_plot_all_writes_next_to_the_table(store, capsys):
    from bench.cli import main

    assert main(["plot", "--results-dir", str(store.root), "--kind", "all"]) == 0
    printed = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in printed}
    assert {"bars_auc_linear-probe_f1.png", "fractions_auc_chexpert.pdf", "roc_chexpert_linear-probe_f0.1.png"} <= names
    assert all(p.startswith(str(store.root / "plots")) for p in printed)
    assert main(["plot", "--results-dir", str(store.root), "--kind", "bars", "--datasets", "nih"]) == 2
    assert "datasets present: chexpert" in capsys.readouterr().err
