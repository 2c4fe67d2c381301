import json
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import TINY
from optuna.trial import TrialState
from tests_support import bench_cli

from bench.core.errors import UserError
from bench.core.registry import PROTOCOLS
from bench.experiment.config import compose_config
from bench.tools.sweep.spec import Objective, SweepSpec, parse_param
from bench.tools.sweep.study import finalize, load_study, run_sweep

# trials as short as a real pretraining run can be: 2 epochs of the tiny corpus, scored on rsna's val split
FAST = [*TINY, "eval.datasets=[rsna]"]


def spec_for(tmp_path, trials: int, objective: str = "rsna:zero-shot:auc", pruner: str = "none",
             params=("temperature=0.03:0.1",), method: str = "clip", extra=()) -> SweepSpec:
    overrides = [*FAST, *extra]
    base = compose_config(method, overrides=overrides)
    return SweepSpec(method, "none", [parse_param(p, base) for p in params], Objective.parse(objective, ["rsna"]),
                     [0], overrides, trials, "random", pruner, 0, str(tmp_path / "results"))


def finished(study) -> list:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_params_resolve_to_config_keys():
    cfg = compose_config("mmclip")
    p = parse_param("mask_ratio=0.3:0.9", cfg)
    assert (p.key, p.low, p.high, p.scale) == ("method.image_masking.mask_ratio", 0.3, 0.9, "float")
    assert parse_param("trainer.lr=1e-5:1e-2:log", cfg).scale == "log"
    assert parse_param("trainer.budget.epochs=1:4:int", cfg).scale == "int"
    assert parse_param("image_masking.strategy=attention,random", cfg).choices == ("attention", "random")
    assert parse_param("loss_weights.mim=0.5,1,2", cfg).choices == (0.5, 1, 2)
    for bad, message in (("lr=1e-4:1e-2", "ambiguous"), ("nope=1:2", "no such setting"),
                         ("mask_ratio=0.9:0.3", "LOW < HIGH"), ("mask_ratio=0:1:log", "positive"),
                         ("mask_ratio=a:b", "numbers"), ("mask_ratio", "expected")):
        with pytest.raises(UserError, match=message):
            parse_param(bad, cfg)
    objective = Objective.parse("linear-probe:auc", ["rsna", "nih"])
    assert (objective.datasets, objective.protocol, objective.fraction) == (("rsna", "nih"), "linear-probe", 1.0)
    assert Objective.parse("siim:fine-tune:f1:0.1", []).fraction == 0.1
    for bad in ("rsna:probe:auc", "rsna:zero-shot:loss", "nope:zero-shot:auc"):
        with pytest.raises(UserError):
            Objective.parse(bad, ["rsna"])
    with pytest.raises(UserError, match="grid needs"):
        SweepSpec("mmclip", "none", [parse_param("mask_ratio=0.3:0.9", cfg)], objective, [0], [], sampler="grid")


def test_resume_runs_only_missing_trials_and_refuses_another_search(data_home, tmp_path):
    spec = spec_for(tmp_path, trials=2)
    assert run_sweep(spec)["ran"] == 2
    study, _ = load_study(spec)
    first = {t.number: (t.params, t.value) for t in finished(study)}
    runs = sorted((tmp_path / "results" / "runs").glob("*/final.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert len(first) == 2 and len(runs) == 2

    assert run_sweep(spec)["ran"] == 0, "a finished study runs nothing"
    more = spec_for(tmp_path, trials=3)
    assert more.study_name == spec.study_name  # the number of trials is not part of the search
    assert run_sweep(more)["ran"] == 1
    study, _ = load_study(more)
    assert len(finished(study)) == 3
    assert {t.number: (t.params, t.value) for t in finished(study) if t.number in first} == first
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps, "finished trials' pretraining is not redone"

    folder = more.folder
    trials = (folder / "trials.csv").read_text().splitlines()
    assert trials[0].startswith("number,state,value,param/temperature") and len(trials) == 4
    best = json.loads((folder / "best.json").read_text())
    assert best["best"]["value"] == max(t.value for t in study.get_trials() if t.state == TrialState.COMPLETE)
    assert {"history.png", "slice.png", "importance.png", "intermediate.png"} <= {p.name for p in folder.iterdir()}

    other = spec_for(tmp_path, trials=3, params=("temperature=0.01:0.2",))
    other.study_name = spec.study_name
    with pytest.raises(UserError, match="different search"):
        load_study(other)


def test_two_concurrent_workers_share_one_study(data_home, tmp_path):
    args = ["sweep", "--method", "clip", "--param", "temperature=0.03:0.1", "--trials", "3", "--objective",
            "rsna:zero-shot:auc", "--pruner", "none", "--results-dir", str(tmp_path / "results"), *FAST]
    exe = Path(sys.executable).with_name("bench")
    workers = [subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outs]
    folder = next((tmp_path / "results" / "sweeps").iterdir())
    study = optuna.load_study(study_name=folder.name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal"))))
    assert len(finished(study)) == 3
    ran = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert len(ran) == 3, "no trial beyond the requested three was run"
    assert len({t.user_attrs["worker"]["pid"] for t in ran}) == 2, "both workers took trials"


def test_pruning_stops_a_trial_below_the_median(data_home, tmp_path):
    spec = spec_for(tmp_path, trials=3, objective="rsna:linear-probe:auc", pruner="median")
    study, _ = load_study(spec)
    key = spec.params[0].key
    for value in (0.06, 0.07):  # two earlier trials that were perfect after every epoch
        study.add_trial(optuna.trial.create_trial(
            params={key: value}, distributions={key: optuna.distributions.FloatDistribution(0.03, 0.1)},
            value=1.0, intermediate_values={0: 1.0, 1: 1.0}))
    assert run_sweep(spec)["ran"] == 1
    study, _ = load_study(spec)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_at"]["step"] == 0
    run_dir = next((tmp_path / "results" / "runs").iterdir())
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = {json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert epochs == {0} and steps, "training stopped after the first epoch"
    assert not (run_dir / "final.pt").exists(), "a pruned run is not a finished pretraining"


def test_no_test_sample_is_read_during_a_sweep(data_home, tmp_path, monkeypatch):
    from bench.data.images import ImageCache
    from bench.data.loading import load_dataset
    from bench.data.splits import SealedSplit, sealed

    read: list[str] = []
    entry = ImageCache.entry
    monkeypatch.setattr(ImageCache, "entry", lambda self, path: read.append(str(path)) or entry(self, path))
    extra = ["runtime.decode_workers=1", f"data.cache_dir={tmp_path / 'cache'}", "eval.fine_tune.epochs=1"]
    for objective in ("rsna:linear-probe:auc", "rsna:fine-tune:auc", "rsna:zero-shot:auc"):
        spec = spec_for(tmp_path, trials=1, objective=objective, extra=extra)
        assert run_sweep(spec)["ran"] == 1
    data = load_dataset(compose_config("clip", overrides=[*FAST, *extra]), "rsna")
    paths = {split: set(data.manifest.loc[data.manifest["split"] == split, "image_path"].astype(str))
             for split in ("train", "val", "test")}
    assert paths["val"] & set(read) == paths["val"], "every validation image was scored"
    assert not paths["test"] & set(read), "no test image was opened"
    with sealed("test"), pytest.raises(SealedSplit, match="sealed"):
        data.rows("test")
    assert len(data.rows("test")) == len(paths["test"])  # open again outside the sweep


def test_abandoned_trial_is_retried_with_its_parameters(data_home, tmp_path):
    spec = spec_for(tmp_path, trials=1)
    study, _ = load_study(spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask({spec.params[0].key: optuna.distributions.FloatDistribution(0.03, 0.1)})
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    params = dict(study.trials[-1].params)
    assert run_sweep(spec)["ran"] == 1
    study, _ = load_study(spec)
    old, retry = study.trials[0], study.trials[-1]
    assert old.state == TrialState.FAIL and old.user_attrs["abandoned"]
    assert retry.state == TrialState.COMPLETE and retry.params == params and retry.user_attrs["retry_of"] == 0


def test_finalize_writes_test_records_marked_with_the_study(data_home, tmp_path):
    spec = spec_for(tmp_path, trials=2)
    with pytest.raises(UserError, match="no study"):
        finalize(spec, [0])
    run_sweep(spec)
    written = finalize(spec, [0, 1])
    records = [json.loads(Path(p).read_text()) for p in written]
    best = json.loads((spec.folder / "best.json").read_text())["best"]
    assert {r["pretrain_seed"] for r in records} == {0, 1}
    assert {r["protocol"] for r in records} == {"zero-shot", "linear-probe"}
    for r in records:
        assert r["ablation"] == f"sweep-{spec.study_name}" and r["n_test"] > 0
        assert r["sweep"]["trial"] == best["trial"] and r["sweep"]["params"] == best["params"]
        assert r["config"]["method"]["temperature"] == pytest.approx(best["params"]["method.temperature"])
    table = bench_cli("table", "--results-dir", str(tmp_path / "results"), "--methods", f"clip:sweep-{spec.study_name}")
    assert table.returncode == 0, table.stderr
    assert f"sweep-{spec.study_name}" in table.stdout and "(n=2)" in table.stdout


@pytest.mark.parametrize("objective,method", [("siim:segmentation:dice", "clip"), ("retrieval:t2i_r@1", "mlip")])
def test_a_sweep_tunes_on_segmentation_or_retrieval(data_home, tmp_path, objective, method):
    extra = ("eval.segmentation.epochs=1", "eval.segmentation.batch_size=8", "eval.retrieval.ks=[1]")
    base = compose_config(method, overrides=[*FAST, *extra])
    parsed = Objective.parse(objective, lambda p: PROTOCOLS.get(p).datasets(base))
    # retrieval names no dataset: its own (the one with reports, and CheXpert 5x200)
    assert parsed.datasets == (("siim",) if "siim" in objective else ("mimic-cxr", "chexpert-5x200"))
    if "retrieval" in objective:
        parsed = Objective.parse("mimic-cxr:" + objective, [])
    params = ("mask_ratio=0.3:0.6",) if method == "mlip" else ("temperature=0.03:0.1",)
    spec = SweepSpec(method, "none", [parse_param(p, base) for p in params], parsed, [0], [*FAST, *extra], 1,
                     "random", "none", 0, str(tmp_path / "results"))
    assert spec.params[0].key == ("method.masking.mask_ratio" if method == "mlip" else "method.temperature")
    assert run_sweep(spec)["ran"] == 1
    study, _ = load_study(spec)
    (trial,) = finished(study)
    assert trial.state == TrialState.COMPLETE and 0.0 <= trial.value <= 1.0
