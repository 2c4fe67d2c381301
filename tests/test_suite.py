import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tests_support import tree_digest

from bench.cli import main as cli_main
from bench.core.errors import UserError
from bench.core.results import ResultsStore
from bench.tools.suite import load_suite, plan

EXE = str(Path(sys.executable).with_name("bench"))
UNIT_LINE = re.compile(r"\] (pretrain|random-init) (\S+) seed (\d+): (.*)")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`bench ...` in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _records(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in results.glob("records/*/*.json")}


def _stamps(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}


def _written(output: str) -> int:
    return int(re.search(r"(\d+) record\(s\) written, \d+ already there", output)[1])


def _smoke_with(tmp_path: Path, runs: dict) -> Path:
    """A suite file with the smoke suite's settings and other runs."""
    path = tmp_path / "suite.yaml"
    suite = OmegaConf.load(load_suite("smoke").path)
    suite.runs = runs
    OmegaConf.save(suite, path)
    return path


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, "the suite ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_dry_run_counts_a_fresh_grid_with_shared_baselines_and_worker_shares(data_home, tmp_path, capsys,
                                                                            monkeypatch):
    import bench.data.images
    from bench.modeling.method import Method

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run builds no model and reads no image")

    monkeypatch.setattr(Method, "__init__", refuse)
    monkeypatch.setattr(bench.data.images, "read_image", refuse)
    suite = tmp_path / "grid.yaml"
    # mask-ratio-0.75 sets the default value: its own pretraining run, but the same untrained model as none
    suite.write_text("runs:\n  mmclip: [none, mask-ratio-0.75]\n  mrm: [none]\nseeds: [0, 1]\n"
                     "overrides: [data.synthetic.size=tiny]\n"
                     "eval_overrides: ['eval.datasets=[rsna,siim]', 'eval.fractions=[0.1,1.0]',\n"
                     "                 'eval.fine_tune.fractions=null']\n")
    code, out, err = _cli(capsys, "suite", str(suite), "--dry-run", "--worker", "2/2",
                          "--results-dir", str(tmp_path / "results"))
    assert code == 0, err
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"
    units = [m.groups()[:3] for m in map(re.compile(r"\s+\d+\s+\d/2\s+(\S+)\s+(\S+)\s+(\d)\s").match,
                                         out.splitlines()) if m]
    assert units == [("pretrain", "mmclip/none", "0"), ("random-init", "mmclip/none", "0"),
                     ("pretrain", "mmclip/mask-ratio-0.75", "0"), ("pretrain", "mrm/none", "0"),
                     ("random-init", "mrm/none", "0"), ("pretrain", "mmclip/none", "1"),
                     ("random-init", "mmclip/none", "1"), ("pretrain", "mmclip/mask-ratio-0.75", "1"),
                     ("pretrain", "mrm/none", "1"), ("random-init", "mrm/none", "1")]
    # per model: mmclip 2 datasets x (zero-shot + 2 fractions x (linear probe, fine-tune)) = 10; mrm has no
    # zero-shot: 8. Runs 2x10 + 8 per seed, baselines 10 + 8 per seed.
    assert ("total: 10 units (6 pretraining runs, 4 random-init baselines); pretraining: 0 done, 0 partial, "
            "6 to do; records: 0 done, 92 to do") in out
    assert "worker 1/2: 5 units (3 pretraining runs, 2 random-init baselines); pretraining: 0 done, 0 partial, " \
           "3 to do; records: 0 done, 48 to do" in out
    assert "worker 2/2: 5 units (3 pretraining runs, 2 random-init baselines); pretraining: 0 done, 0 partial, " \
           "3 to do; records: 0 done, 44 to do" in out


def test_suite_resumes_after_a_kill_and_then_has_nothing_to_do(data_home, tmp_path, capsys):
    """Kill `bench suite smoke` in the middle of its second pretraining run; the same command finishes the grid
    without redoing a finished step, and a further run does nothing at all."""
    results = tmp_path / "results"
    args = ["suite", "smoke", "--results-dir", str(results)]
    units = plan(load_suite("smoke"), [], str(results))
    planned = {ResultsStore(results).record_path(k) for u in units for k in u.records}
    # 3 runs + 2 baselines (mmclip's ablations share theirs), rsna zero-shot and linear probe each
    assert len(planned) == 10
    mmclip_run = next(u.run_dir for u in units if u.method == "mmclip")

    killed = subprocess.Popen([EXE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(killed, lambda: (mmclip_run / "checkpoint.pt").exists())
    assert not (mmclip_run / "final.pt").exists(), "killed too late: the run had already finished"
    before = _records(results)
    assert len(before) == 4  # clip's run and its baseline were finished
    code, out, err = _cli(capsys, *args, "--dry-run")
    assert code == 0, err
    assert "pretraining: 1 done, 1 partial, 1 to do; records: 4 done, 6 to do" in out

    code, out, err = _cli(capsys, *args)  # the same command again, in this process
    assert code == 0, err
    lines = {f"{m[1]} {m[2]}": m[4] for m in map(UNIT_LINE.search, out.splitlines()) if m}
    assert lines["pretrain clip/none"] == lines["random-init clip/none"] == "finished already"
    assert lines["pretrain mmclip/none"].startswith("resumed in"), out
    assert lines["pretrain mmclip/no-attmim"].startswith("trained in"), out
    assert _written(out) == 6, "only what was missing is written"
    after = _records(results)
    assert set(after) == planned
    assert {p: after[p] for p in before} == before, "a finished record was redone"
    assert {json.loads(p.read_text())["suite"]["name"] for p in after} == {"smoke"}

    stamps, digest = _stamps(results), tree_digest(results)
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert "nothing to do: all 5 unit(s) were finished (10 records)" in out
    assert _stamps(results) == stamps and tree_digest(results) == digest, "a finished suite writes nothing"


def test_two_workers_on_one_results_folder_split_the_work_and_do_each_step_once(data_home, tmp_path, capsys):
    results, path = tmp_path / "results", _smoke_with(tmp_path, {"clip": ["none"], "mmclip": ["no-attmim"]})
    suite = load_suite(str(path))
    shares = {w: plan(suite, [], str(results), workers=2) for w in (1, 2)}
    assert [u.label for u in shares[1]] == [u.label for u in shares[2]], "every worker plans the same units"
    units = shares[1]
    mine = {w: [u for u in units if u.worker == w] for w in (1, 2)}
    assert len(mine[1]) + len(mine[2]) == len(units) == 4
    for kind in ("pretrain", "random-init"):
        assert {u.worker for u in units if u.kind == kind} == {1, 2}, f"{kind} units are dealt to both workers"
    keys = {w: {k for u in mine[w] for k in u.records} for w in (1, 2)}
    assert not keys[1] & keys[2] and len(keys[1] | keys[2]) == 8
    assert not {u.run_dir for u in mine[1]} & {u.run_dir for u in mine[2]} - {None}

    procs = {w: subprocess.Popen([EXE, "suite", str(path), "--worker", f"{w}/2", "--results-dir", str(results),
                                  "runtime.threads=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in (1, 2)}
    outputs = {w: p.communicate(timeout=600) for w, p in procs.items()}
    for w, (out, err) in outputs.items():
        assert procs[w].returncode == 0, err
        ran = [f"{m[1]} {m[2]} seed {m[3]}" for m in map(UNIT_LINE.search, out.splitlines()) if m]
        assert ran == [u.label for u in mine[w]]
    assert sum(_written(out) for out, _ in outputs.values()) == 8, "each record is written exactly once"
    assert sum(out.count(": trained in") for out, _ in outputs.values()) == 2, "each run is trained once"
    store = ResultsStore(results)
    for w in (1, 2):
        for key in keys[w]:
            assert json.loads(store.record_path(key).read_text())["suite"]["worker"] == f"{w}/2"

    stamps = _stamps(results)
    code, out, err = _cli(capsys, "suite", str(path), "--worker", "1/2", "--results-dir", str(results))
    assert code == 0 and f"nothing to do: all {len(mine[1])} unit(s) were finished" in out
    assert _stamps(results) == stamps


def test_a_diverging_run_is_reported_and_the_others_go_on(data_home, tmp_path, capsys, monkeypatch):
    from bench.core.registry import METHODS

    clip = METHODS.get("clip")
    step = clip.training_step

    def nan_without_ablation(self, batch):
        out = step(self, batch)
        if self.cfg.ablation == "none":
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(clip, "training_step", nan_without_ablation)
    path = _smoke_with(tmp_path, {"clip": ["none", "fixed-temperature"]})
    code, out, err = _cli(capsys, "suite", str(path), "--results-dir", str(tmp_path / "results"),
                          "eval.random_init_baseline=false")
    assert code == 1
    assert "pretrain clip/none seed 0: training stopped: loss became nan at step 1" in out
    assert "pretrain clip/fixed-temperature seed 0: trained in" in out
    assert "1 run(s) diverged (the others went on): pretrain clip/none seed 0" in err
    assert len(list((tmp_path / "results").glob("records/clip/fixed-temperature__*.json"))) == 2


@pytest.mark.parametrize("text, message", [
    ("runs: {clip: [none]}\nseeds: [0]\nepochs: 3\n", "unknown key(s) epochs; valid keys: runs, seeds, overrides, eval_overrides, budgets"),
    ("runs: {nope: [none]}\nseeds: [0]\n", "unknown method 'nope' in runs; valid methods: clip"),
    ("runs: {clip: [nope]}\nseeds: [0]\n", "clip/nope: unknown ablation 'nope' for method 'clip'; valid "
                                           "ablations: none, fixed-temperature, frozen-text"),
    ("runs: {clip: none}\nseeds: [0]\n", "runs.clip must be a non-empty list of ablation names"),
    ("runs: {clip: [none, none]}\nseeds: [0]\n", "runs.clip lists none more than once"),
    ("runs: {clip: [none]}\nseeds: [a]\n", "seeds must be a non-empty list of distinct integers"),
    ("runs: {clip: [none]}\nseeds: [0]\noverrides: [seed=3]\n", "sets seed, which the suite's grid sets"),
    ("runs: {clip: [none]}\nseeds: [0]\neval_overrides: [trainer.budget.epochs=2]\n", "is not an eval.* setting"),
    ("runs: {clip: [none]}\nseeds: [0]\noverrides: [trainer.nope=2]\n", "clip/none: unknown setting trainer.nope"),
    ("runs: [clip\n", "not a readable suite file"),
])
def test_bad_suite_file_is_one_line_naming_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = _cli(capsys, "suite", str(path), "--dry-run", "--results-dir", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"bench: error: {path}: ") and message in err, err


def test_a_grid_of_unequal_budgets_is_refused_unless_the_file_allows_it(tmp_path, monkeypatch):
    """An ablation that trains longer than the run it is compared with is caught before anything runs."""
    from bench.experiment import config

    compose = config.compose_config

    def longer_for_one(method, ablation=None, seed=None, overrides=()):
        extra = ["trainer.budget.epochs=3"] if ablation == "fixed-temperature" else []
        return compose(method, ablation, seed, [*overrides, *extra])

    monkeypatch.setattr(config, "compose_config", longer_for_one)
    grid = "runs: {clip: [none, fixed-temperature]}\nseeds: [0]\n"
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    with pytest.raises(UserError, match=r"clip/fixed-temperature would train under another budget than "
                                        r"clip/none \(it differs in budget: .*budgets: may-differ"):
        plan(load_suite(str(path)), results_dir=str(tmp_path / "r"))
    path.write_text(grid + "budgets: may-differ\n")
    assert [u.kind for u in plan(load_suite(str(path)), results_dir=str(tmp_path / "r"))].count("pretrain") == 2
    path.write_text(grid + "budgets: some\n")
    with pytest.raises(UserError, match="budgets='some': expected one of equal, may-differ"):
        load_suite(str(path))


def test_unknown_suite_name_and_bad_worker_are_one_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "suite", "nope", "--dry-run")
    assert code == 2 and ("no suite 'nope': not a file and not a named suite; named suites: ablations, controls, "
                          "methods, smoke") in err
    code, _, err = _cli(capsys, "suite", "smoke", "--worker", "3/2", "--dry-run")
    assert code == 2 and "--worker '3/2': expected I/N with 1 <= I <= N" in err
    assert len(err.strip().splitlines()) == 1
