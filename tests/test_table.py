import hashlib
import io
import json

import numpy as np
import pandas as pd
import pytest

import bench.evaluation.stats
from bench.core.errors import UserError
from bench.core.results import RecordKey, ResultsStore
from bench.evaluation.metrics import task_metrics
from bench.evaluation.stats import bootstrap, combined_ci
from bench.report.table import build_table

LABELS = ["Atelectasis", "Effusion", "Edema"]


def _rec(method, ablation, seed, protocol, auc, phash="h1" * 8, dataset="chexpert", fraction=1.0, **extra):
    metrics = {} if auc is None else {"auc": auc}
    return {"method": method, "ablation": ablation, "pretrain_hash": phash, "pretrain_seed": seed,
            "eval_seed": 0, "eval_hash": "e" * 16, "dataset": dataset, "protocol": protocol, "fraction": fraction,
            "metrics": metrics, **extra}


def _boot(reps, test_ids="t" * 64, metric="auc"):
    return {"resamples": len(reps), "seed": 0, "confidence": 0.95, "test_ids_sha256": test_ids,
            "ci": {metric: [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]},
            "replicates": {metric: list(map(float, reps))}}


def _truth(n=240, seed=0):
    return (np.random.default_rng(seed).random((n, len(LABELS))) < 0.4).astype(float)


def _write(store, method, ablation, seed, y, signal, *, dataset="chexpert", protocol="linear-probe",
           fraction=1.0, phash="a" * 16, noise_seed=None, sample_offset=0, resamples=300):
    """A real record: scores = signal * truth + noise, metrics, bootstrap replicates and predictions."""
    rng = np.random.default_rng(1000 + seed if noise_seed is None else noise_seed)
    scores = signal * y + rng.normal(size=y.shape)
    metrics, per_class = task_metrics("multi-label", y, scores, LABELS)
    boot = bootstrap("multi-label", y, scores, None, resamples, 0)
    ids = [f"s{i + sample_offset}" for i in range(len(y))]
    record = {"metrics": metrics, "per_class": per_class, "n_test": len(y),
              "task": {"labels": LABELS, "kind": "multi-label", "metric": "auc"},
              "bootstrap": {"resamples": resamples, "seed": 0, "confidence": 0.95,
                            "test_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                            "ci": boot["ci"], "replicates": {k: list(map(float, v))
                                                             for k, v in boot["replicates"].items()}}}
    preds = pd.DataFrame({"sample_id": ids, **{f"true/{c}": y[:, j] for j, c in enumerate(LABELS)},
                          **{f"score/{c}": scores[:, j] for j, c in enumerate(LABELS)}})
    key = RecordKey(method, ablation, phash, seed, dataset, protocol, fraction, 0, "e" * 16)
    store.write(key, record, preds)
    return metrics


def _md_cells(out):
    """{first cell: [cells]} of a markdown table's body."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0] if cells[1] in ("none", "") else f"{cells[0]}:{cells[1]}"] = cells
    return rows


def test_mean_std_over_seeds_with_count():
    recs = [_rec("clip", "none", s, "zero-shot", v) for s, v in enumerate([0.7, 0.8, 0.9])]
    out = build_table(recs, "auc")
    assert f"0.800±{np.std([0.7, 0.8, 0.9], ddof=1):.3f} (n=3)" in out
    assert build_table(recs[:1], "auc").count("0.700 (n=1)") == 1


def test_a_missing_metric_or_cell_is_shown_as_missing():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.7), _rec("clip", "none", 0, "linear-probe", None),
            _rec("random-init", "clip", 0, "zero-shot", 0.5)]
    out = build_table(recs, "auc")
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "missing" in lines["clip"]  # its linear-probe record has no AUC
    assert "missing" in lines["random-init"]  # it has no linear-probe record at all
    assert "chexpert linear-probe" in out
    long = pd.read_csv(io.StringIO(build_table(recs, "auc", fmt="csv")))
    absent = long[(long.method == "random-init") & (long.protocol == "linear-probe")].iloc[0]
    assert absent.n == 0 and absent.records == 0 and np.isnan(absent["mean"])  # every cell is in the long form
    # a metric some records lack: those cells say missing; one no record has: an error naming those present
    recs[0]["metrics"]["f1"] = 0.6
    assert "0.600 (n=1)" in build_table(recs, "f1") and "missing" in build_table(recs, "f1")
    with pytest.raises(UserError, match="metrics present: auc, f1"):
        build_table(recs, "mcc")


def test_different_configurations_are_never_pooled():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.7, "a" * 16), _rec("clip", "none", 0, "zero-shot", 0.9, "b" * 16)]
    out = build_table(recs, "auc")
    assert "0.700 (n=1)" in out and "0.900 (n=1)" in out and "variant" in out
    # same pretrain config, different eval settings in one cell: not pooled either
    other = [_rec("clip", "none", 0, "zero-shot", 0.7), {**_rec("clip", "none", 1, "zero-shot", 0.9),
                                                         "eval_hash": "f" * 16}]
    out = build_table(other, "auc")
    assert "0.700 (n=1)" in out and "0.900 (n=1)" in out and "eval ffffffff" in out


def test_formats():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.75), _rec("mrm", "none", 0, "zero-shot", 0.65)]
    latex = build_table(recs, "auc", fmt="latex")
    assert "\\toprule" in latex and "\\begin{tabular}" in latex and "\\textbf{0.750 (n=1)}" in latex
    csv = build_table(recs, "auc", fmt="csv")
    assert csv.splitlines()[0].startswith("method,ablation,pretrain_hash,dataset,protocol,fraction,mean")
    header = csv.splitlines()[0].split(",")
    for col in ("std", "n", "records", "ci_lo", "ci_hi", "best", "delta", "p", "p_holm", "marker"):
        assert col in header
    doc = json.loads(build_table(recs, "auc", fmt="json"))
    assert doc["metric"] == "auc" and doc["notes"]
    assert [(c["method"], c["mean"], c["n"], c["best"]) for c in doc["cells"]] == [
        ("clip", 0.75, 1, True), ("mrm", 0.65, 1, False)]
    with pytest.raises(UserError, match="valid formats"):
        build_table(recs, "auc", fmt="xlsx")
    with pytest.raises(UserError, match="no results records"):
        build_table([], "auc")


def test_best_is_marked_per_column_among_measured_rows():
    recs = [_rec("clip", "none", 0, "zero-shot", 0.70), _rec("mmclip", "none", 0, "zero-shot", 0.80),
            _rec("clip", "none", 0, "zero-shot", 0.90, dataset="rsna"),
            _rec("random-init", "clip", 0, "zero-shot", 0.95, phash="r" * 16, dataset="rsna")]
    rows = _md_cells(build_table(recs, "auc"))
    assert rows["mmclip"][2] == "**0.800 (n=1)**" and rows["clip"][2] == "0.700 (n=1)"
    assert rows["random-init:clip"][3] == "**0.950 (n=1)**"  # measured: the baseline competes
    doc = pd.read_csv(io.StringIO(build_table(recs, "auc", fmt="csv")))
    best = doc[doc.best]
    assert sorted(zip(best.method, best.dataset)) == [("mmclip", "chexpert"), ("random-init", "rsna")]


def _three_seed_store(tmp_path):
    store = ResultsStore(tmp_path / "results")
    y = _truth()
    for seed in range(3):
        _write(store, "mmclip", "none", seed, y, 0.6)
        _write(store, "clip", "none", seed, y, 1.6)  # clearly better
        _write(store, "mrm", "none", seed, y, 0.6, noise_seed=1000 + seed)  # the very same scores as mmclip
    return store


def test_delta_to_marks_a_clearly_better_row_and_not_an_equal_one(tmp_path):
    store = _three_seed_store(tmp_path)
    records = store.records()
    out = build_table(records, "auc", delta_to="mmclip")
    rows = _md_cells(out)
    mm = [r for r in records if r["method"] == "mmclip"]
    cl = [r for r in records if r["method"] == "clip"]
    delta = np.mean([r["metrics"]["auc"] for r in cl]) - np.mean([r["metrics"]["auc"] for r in mm])
    assert delta > 0.1
    assert rows["clip"][2].startswith(f"**+{delta:.3f}\\*\\*")  # bold: best; at least ** (p < 0.01)
    assert rows["mrm"][2] == "+0.000 (n=3)"  # equal: no marker
    assert rows["mmclip"][2].startswith(f"{np.mean([r['metrics']['auc'] for r in mm]):.3f}±")  # absolute
    assert "Holm" in out and "\\*\\*\\* p<0.001" in out
    doc = pd.read_csv(io.StringIO(build_table(records, "auc", fmt="csv", delta_to="mmclip:none")))
    clip = doc[doc.method == "clip"].iloc[0]
    assert clip.p < 0.01 and clip.p_holm == clip.p and clip.marker == "**" and clip.test == "bootstrap"
    assert clip.delta_ci_lo > 0
    assert np.isnan(doc[doc.method == "mmclip"].iloc[0].delta)
    with pytest.raises(UserError, match="rows: clip:none, mmclip:none, mrm:none"):
        build_table(records, "auc", delta_to="nope")


def test_delong_with_several_seeds_is_refused_as_it_would_test_another_quantity(tmp_path):
    records = _three_seed_store(tmp_path).records()
    with pytest.raises(UserError, match=r"--test delong compares one record per side, but clip:none has 3 records "
                                        r"\(seeds\) in chexpert linear-probe 100%; use --test bootstrap") as err:
        build_table(records, "auc", delta_to="mmclip", test="delong")
    assert "\n" not in str(err.value)
    one_clip = [r for r in records if r["method"] != "clip" or r["pretrain_seed"] == 0]
    with pytest.raises(UserError, match="mmclip:none \\(the reference\\) has 3 records"):
        build_table(one_clip, "auc", delta_to="mmclip", test="delong")


def _one_seed_store(tmp_path, y):
    store = ResultsStore(tmp_path / "results")
    _write(store, "mmclip", "none", 0, y, 0.6)
    _write(store, "clip", "none", 0, y, 1.6)
    _write(store, "mrm", "none", 0, y, 0.6, noise_seed=1000)  # the very same scores as mmclip
    return store


@pytest.mark.parametrize("test", ["bootstrap", "delong"])
def test_the_delta_shown_is_the_delta_tested(tmp_path, test, monkeypatch):
    y = _truth()
    y[:, 2] = 0.0
    y[5, 2] = 1.0  # Edema: one positive, so DeLong leaves it out of the macro test
    records = _one_seed_store(tmp_path, y).records()
    tested = {}
    for name in ("delong", "paired_bootstrap"):
        real = getattr(bench.evaluation.stats, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            res = _real(*args, **kwargs)
            tested.setdefault(_name, []).append(res["delta"])
            return res

        monkeypatch.setattr(bench.evaluation.stats, name, spy)
    doc = pd.read_csv(io.StringIO(build_table(records, "auc", fmt="csv", delta_to="mmclip", test=test)))
    compared = doc[doc.method != "mmclip"].set_index("method")
    name = "delong" if test == "delong" else "paired_bootstrap"
    assert sorted(compared["delta"]) == pytest.approx(sorted(tested[name]), abs=0)
    clip = compared.loc["clip"]
    shown = _md_cells(build_table(records, "auc", delta_to="mmclip", test=test))["clip"][2]
    marker = clip.marker.replace("*", "\\*")
    assert shown.startswith(f"**{clip.delta:+.3f}{marker} (n=1)") and clip.p < 0.05 and clip.test == test
    by_record = np.mean([r["metrics"]["auc"] for r in records if r["method"] == "clip"]) - \
        np.mean([r["metrics"]["auc"] for r in records if r["method"] == "mmclip"])
    if test == "delong":  # the records' macro AUCs average Edema too; DeLong's Δ does not, and says so
        assert clip.delta != pytest.approx(by_record, abs=1e-6)
        assert "left out: Edema (1 positive(s), 239 negative(s))" in clip.note
    else:
        assert clip.delta == pytest.approx(by_record, abs=1e-12)


def test_delong_on_one_record_per_side_matches_the_records(tmp_path):
    records = _one_seed_store(tmp_path, _truth()).records()
    rows = _md_cells(build_table(records, "auc", delta_to="mmclip", test="delong"))
    clip = next(r for r in records if r["method"] == "clip")["metrics"]["auc"]
    mm = next(r for r in records if r["method"] == "mmclip")["metrics"]["auc"]
    assert rows["clip"][2].startswith(f"**+{clip - mm:.3f}\\*\\*\\*") and rows["mrm"][2] == "+0.000 (n=1)"


def test_classes_rare_in_the_test_split_are_named_under_the_table(tmp_path):
    rare = {"Edema": {"positives": 2, "negatives": 238}}
    recs = [_rec("clip", "none", 0, "linear-probe", 0.7, dataset="nih", rare_classes=rare),
            _rec("clip", "none", 1, "linear-probe", 0.7, dataset="nih", rare_classes=rare),
            _rec("clip", "none", 0, "linear-probe", 0.7, dataset="chexpert", rare_classes={})]
    doc = json.loads(build_table(recs, "auc", fmt="json"))
    notes = [n for n in doc["notes"] if "few test samples" in n]
    assert notes == [("nih: few test samples of Edema (2 positives) (fewer than 5 positives or negatives): their "
                      "per-class values rest on a handful of samples, and the macro AUC's CI on the resamples that "
                      "draw every class")]


def test_holm_correction_across_datasets_decides_the_marker(monkeypatch):
    reps = np.linspace(0.6, 0.8, 50)
    recs = []
    for ds in ("chexpert", "rsna"):
        for m in ("mmclip", "clip"):
            recs.append(_rec(m, "none", 0, "linear-probe", 0.7, dataset=ds, bootstrap=_boot(reps)))
    raw = {"chexpert": 0.03, "rsna": 0.04}
    calls = []

    def fake(a, b, seed=0, point_a=None, point_b=None):
        calls.append(1)
        return {"delta": 0.0, "ci": [-0.01, 0.01], "p": raw["chexpert" if len(calls) == 1 else "rsna"]}

    monkeypatch.setattr(bench.evaluation.stats, "paired_bootstrap", fake)
    doc = pd.read_csv(io.StringIO(build_table(recs, "auc", fmt="csv", delta_to="mmclip")))
    clip = doc[doc.method == "clip"].set_index("dataset")
    assert clip.loc["chexpert", "p"] == 0.03 and clip.loc["rsna", "p"] == 0.04  # unadjusted: both < 0.05
    assert clip.loc["chexpert", "p_holm"] == pytest.approx(0.06) and clip.loc["rsna", "p_holm"] == pytest.approx(0.06)
    assert clip.marker.isna().all()  # no marker after Holm
    # one dataset alone: the family has one member, the same p gets its marker
    calls.clear()
    one = build_table([r for r in recs if r["dataset"] == "chexpert"], "auc", delta_to="mmclip")
    assert "+0.000\\* (n=1)" in one
    # --test delong on a metric other than AUC falls back to the paired bootstrap and says so
    for r in recs:
        r["metrics"]["f1"], r["bootstrap"] = 0.5, _boot(reps, metric="f1")
    calls.clear()
    out = build_table([r for r in recs if r["dataset"] == "chexpert"], "f1", delta_to="mmclip", test="delong")
    assert "DeLong applies to AUC only" in out and "+0.000\\* (n=1)" in out and len(calls) == 1


def test_records_on_different_test_sets_are_not_compared(monkeypatch):
    reps = np.linspace(0.6, 0.8, 50)
    recs = [_rec("mmclip", "none", 0, "linear-probe", 0.70, bootstrap=_boot(reps, "a" * 64)),
            _rec("clip", "none", 0, "linear-probe", 0.80, bootstrap=_boot(reps, "b" * 64))]
    monkeypatch.setattr(bench.evaluation.stats, "paired_bootstrap", lambda *a, **k: pytest.fail("must not be called"))
    out = build_table(recs, "auc", delta_to="mmclip")
    assert _md_cells(out)["clip"][2] == "**0.800 (n=1) [Δ n/a]**" and "+0.100" not in out
    assert "different test sets" in out
    doc = json.loads(build_table(recs, "auc", fmt="json", delta_to="mmclip"))
    clip = next(c for c in doc["cells"] if c["method"] == "clip")
    assert clip["delta"] is None and clip["p"] is None and "different test sets" in clip["note"]


def test_ci_is_combined_over_seed_replicates_or_says_it_is_missing():
    rng = np.random.default_rng(0)
    reps = [0.7 + 0.02 * rng.standard_normal(200), 0.75 + 0.02 * rng.standard_normal(200)]
    recs = [_rec("clip", "none", s, "linear-probe", float(np.mean(r)), bootstrap=_boot(r)) for s, r in enumerate(reps)]
    recs.append(_rec("mrm", "none", 0, "linear-probe", 0.6))
    lo, hi = combined_ci(reps, 0.95, seed=0)
    out = build_table(recs, "auc", ci=True)
    rows = _md_cells(out)
    assert rows["clip"][2].endswith(f"(n=2) [{lo:.3f}, {hi:.3f}]**")
    assert rows["mrm"][2] == "0.600 (n=1) [no CI]" and "lack bootstrap replicates" in out


def test_reference_yaml_and_csv_rows_are_quoted_and_never_best(tmp_path):
    recs = [_rec("clip", "none", 0, "linear-probe", 0.70), _rec("mmclip", "none", 0, "linear-probe", 0.75)]
    yml = tmp_path / "published.yaml"
    yml.write_text("- {method: MedKLIP, dataset: chexpert, protocol: linear-probe, metric: auc, value: 0.89,"
                   " std: 0.01, source: 'Wu et al. 2023, Table 2'}\n"
                   "- {method: MedKLIP, dataset: chexpert, protocol: linear-probe, metric: f1, value: 0.5}\n"
                   "- {method: MedKLIP, dataset: nih, protocol: linear-probe, metric: auc, value: 0.8}\n")
    csv = tmp_path / "published.csv"
    csv.write_text("method,dataset,protocol,fraction,metric,value,source\nGLoRIA,chexpert,linear-probe,1.0,auc,0.88,"
                   "Huang 2021\n")
    for ref, name, cell in ((yml, "MedKLIP (quoted)", "0.890±0.010"), (csv, "GLoRIA (quoted)", "0.880")):
        out = build_table(recs, "auc", reference=ref, delta_to="clip")
        rows = _md_cells(out)
        assert rows[name][2] == cell  # absolute, not a delta, not bold although the highest
        assert rows["mmclip"][2].startswith("**+0.050")  # the best measured row keeps the mark
        assert "(quoted)" in out and ("Wu et al. 2023, Table 2" in out or "Huang 2021" in out)
    doc = json.loads(build_table(recs, "auc", fmt="json", reference=yml))
    quoted = [c for c in doc["cells"] if c["kind"] == "quoted"]
    assert len(quoted) == 1 and not quoted[0]["best"] and quoted[0]["mean"] == 0.89  # f1 and nih not shown
    assert any("outside this table's columns" in n for n in doc["notes"])


def test_malformed_reference_files_are_one_line_errors_naming_the_file(tmp_path):
    recs = [_rec("clip", "none", 0, "linear-probe", 0.70)]
    cases = {"nocol.csv": ("method,dataset,metric,value\nX,chexpert,auc,0.8\n", "missing column.*protocol"),
             "nan.csv": ("method,dataset,protocol,metric,value\nX,chexpert,linear-probe,auc,high\n", "non-numeric"),
             "bad.yaml": ("- [unclosed\n", "not readable"),
             "scalar.yaml": ("42\n", "expected a list"),
             "ref.xlsx": ("whatever", "unknown format")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UserError, match=message) as err:
            build_table(recs, "auc", reference=path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        build_table(recs, "auc", reference=tmp_path / "absent.yaml")


def test_prompt_set_takes_the_zero_shot_metric_from_that_set():
    sets = {"chexzero@v1": {"auc": 0.70}, "gloria@v1": {"auc": 0.62}}
    recs = [_rec("clip", "none", 0, "zero-shot", 0.70, prompt_sets=sets),
            _rec("mrm", "none", 0, "zero-shot", 0.65, prompt_sets={"chexzero@v1": {"auc": 0.65}}),
            _rec("clip", "none", 0, "linear-probe", 0.80)]
    rows = _md_cells(build_table(recs, "auc", prompt_set="gloria"))
    assert rows["clip"][2] == "0.620 (n=1)" and rows["clip"][3] == "0.800 (n=1)"  # linear-probe unchanged
    assert rows["mrm"][2] == "missing"
    assert _md_cells(build_table(recs, "auc", prompt_set="chexzero@v1"))["clip"][2] == "**0.700 (n=1)**"
    with pytest.raises(UserError, match="prompt sets present: chexzero@v1, gloria@v1"):
        build_table(recs, "auc", prompt_set="medclip")


def test_filters_keep_what_they_name_and_unknown_values_list_what_exists():
    recs = [_rec("clip", "none", 0, "linear-probe", 0.70),
            _rec("clip", "none", 0, "linear-probe", 0.60, dataset="rsna"),
            _rec("mmclip", "no-attmim", 0, "linear-probe", 0.72), _rec("mmclip", "none", 0, "linear-probe", 0.74),
            _rec("random-init", "mmclip", 0, "linear-probe", 0.5, phash="r" * 16),
            _rec("clip", "none", 0, "linear-probe", 0.55, fraction=0.1)]
    out = build_table(recs, "auc", datasets="chexpert", methods="mmclip:no-attmim", fraction=1.0)
    rows = _md_cells(out)
    assert set(rows) == {"mmclip:no-attmim", "random-init:mmclip"}  # the baseline of a chosen method stays
    assert "rsna" not in out and "10%" not in out
    out = build_table(recs, "auc", fraction="10%")
    assert set(_md_cells(out)) == {"clip"} and "0.550 (n=1)" in out
    out = build_table(recs, "auc", datasets=["rsna", "chexpert"], fraction=1.0)
    assert out.index("| rsna") < out.index("| chexpert")  # columns in the order asked
    with pytest.raises(UserError, match="datasets present: chexpert, rsna"):
        build_table(recs, "auc", datasets="nih")
    with pytest.raises(UserError, match=r"methods present \(method:ablation\): clip:none, mmclip:no-attmim"):
        build_table(recs, "auc", methods="mmclip:nope")
    with pytest.raises(UserError, match="fractions present: 10%, 100%"):
        build_table(recs, "auc", fraction=0.01)
    with pytest.raises(UserError, match="protocols present: linear-probe"):
        build_table(recs, "auc", protocol="zero-shot")


def test_cli_table(tmp_path, capsys):
    from bench.cli import main

    store = _three_seed_store(tmp_path)
    out = tmp_path / "table.json"
    assert main(["table", "--results-dir", str(store.root), "--delta-to", "mmclip", "--ci", "--format", "json",
                 "--out", str(out), "--methods", "clip,mmclip"]) == 0
    doc = json.loads(out.read_text())
    assert {c["method"] for c in doc["cells"]} == {"clip", "mmclip"}
    assert next(c for c in doc["cells"] if c["method"] == "clip")["marker"] == "**"
    assert str(out) in capsys.readouterr().out
    assert main(["table", "--results-dir", str(store.root), "--datasets", "nih"]) == 2
    assert "datasets present: chexpert" in capsys.readouterr().err
    # --seeds keeps the models of those pretraining seeds: n=1 where three seeds were stored
    assert main(["table", "--results-dir", str(store.root), "--seeds", "1", "--methods", "mmclip"]) == 0
    table = capsys.readouterr().out
    assert "(n=1)" in table and "(n=3)" not in table
    assert main(["table", "--results-dir", str(store.root), "--seeds", "0,7"]) == 2
    assert "no records of pretraining seed(s) 7; seeds present: 0, 1, 2" in capsys.readouterr().err


def test_a_contaminated_cell_is_marked_and_its_source_named():
    touched = [{"source": "chexpert", "kind": "image_only", "how": ["same dataset"], "patients": 0, "images": 5}]
    records = [_rec("mmclip", "none", 0, "zero-shot", 0.8, contamination=touched),
               _rec("mmclip", "none", 0, "zero-shot", 0.7, dataset="rsna", contamination=[]),
               _rec("clip", "none", 0, "zero-shot", 0.6)]
    out = build_table(records, "auc")
    cells = _md_cells(out)
    assert cells["mmclip"][2:] == ["**0.800 (n=1) †**", "0.700 (n=1)"]
    assert "†" not in "".join(cells["clip"])
    assert "† mmclip:none saw chexpert's data in pretraining (image_only source chexpert: same dataset (5 images))" in out
    long = json.loads(build_table(records, "auc", fmt="json"))["cells"]
    assert sorted((c["method"], c["dataset"]) for c in long if c["contaminated"]) == [("mmclip", "chexpert")]


def test_cost_columns_say_what_each_row_trained():
    def cost(steps, image_only):
        return {"optimizer_steps": steps, "samples": {"paired": 32 * steps, "image_only": image_only * steps},
                "flops_per_step": 2e9, "flops_counted": "counted", "flops": 2e9 * steps}

    records = [_rec("mmclip", "none", s, "zero-shot", 0.8, cost=cost(448, 16)) for s in (0, 1)]
    records += [_rec("clip", "none", 0, "zero-shot", 0.6, cost=cost(448, 0)), _rec("mrm", "none", 0, "zero-shot", 0.5)]
    out = build_table(records, "auc", cost=True)
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.split("|")[-7:-1]] == ["steps", "paired seen", "image-only seen",
                                                             "text-only seen", "GFLOP/step", "GFLOP"]
    cells = _md_cells(out)
    assert cells["mmclip"][-6:] == ["448", "14,336", "7,168", "0", "2", "896"]
    assert cells["clip"][-6:] == ["448", "14,336", "0", "0", "2", "896"]
    assert cells["mrm"][-6:] == ["?"] * 6  # a record that does not say what it cost
    assert "GFLOP" not in build_table(records, "auc")
    rows = json.loads(build_table(records, "auc", fmt="json", cost=True))["rows"]
    assert {"method": "clip", "ablation": "none", "variant": "", "steps": "448", "paired seen": "14,336",
            "image-only seen": "0", "text-only seen": "0", "GFLOP/step": "2", "GFLOP": "896"} in rows
