"""A number never depends on how it was computed: not on a warm cache, on which files sat at a path before, on
how the work was split over processes, or on two processes being given the same work at once; and what a
killed write leaves behind is cleaned up when the work resumes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from conftest import TINY, TINY_FOLDER
from tests_support import run_dir_of

from bench.core.io import HOST, FileLock, atomic_write_text, remove_stale_temporaries
from bench.core.results import ResultsStore
from bench.experiment.evaluating import evaluate, random_init_subject
from bench.experiment.pretraining import build_method

CPU = torch.device("cpu")


def _predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path.with_name(json.loads(path.read_text())["predictions_file"]))


def test_zero_shot_is_the_same_whether_the_features_were_cached_or_not(tiny_cfg):
    """The text side of zero-shot once ran in training mode (dropout on) whenever the image features came from
    the disk cache, since eval mode was set only where images were encoded."""
    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot]"))
    store, subject = ResultsStore(cfg.results_dir), random_init_subject(cfg)
    runs, predictions, modes = [], [], []
    for _ in range(2):  # a cold cache, then a warm one; the second run rewrites the first one's record
        method = build_method(cfg, 0)
        assert method.training  # as a freshly built or pretrained model is
        runs.append(evaluate(cfg, method, subject, store, CPU, force=True))
        (path,) = runs[-1]["written"]
        predictions.append(_predictions(path))
        modes.append(method.training)
    assert runs[0]["encoder_passes"] and not runs[1]["encoder_passes"], "the second run reads the cache"
    pd.testing.assert_frame_equal(predictions[0], predictions[1])
    assert modes == [True, True], "evaluation leaves the model in the mode it came in"


def test_cached_features_follow_the_image_files(tiny_cfg, data_home, tmp_path):
    """The same dataset from another root whose files have the same names and other contents, or a file
    changed in place, is encoded again; the numbers are those of a fresh results folder."""
    src = data_home / TINY_FOLDER / "rsna-pneumonia-detection-challenge"
    other = tmp_path / "rsna-elsewhere"
    shutil.copytree(src, other)
    images = sorted((other / "stage_2_train_images").glob("*.dcm"))
    contents = [p.read_bytes() for p in images]
    for path, content in zip(images, contents[1:] + contents[:1]):  # every image takes the next one's pixels
        path.write_bytes(content)

    def run(root: Path, results: Path) -> dict:
        cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot,linear-probe]",
                              f"data.rsna.root={root}"))
        cfg.results_dir = str(results)
        return evaluate(cfg, build_method(cfg, 0), random_init_subject(cfg), ResultsStore(results), CPU)

    shared = tmp_path / "shared"
    run(src, shared)
    moved = run(other, shared)
    assert moved["encoder_passes"], "another root's images are encoded, not read from the first root's cache"
    fresh = run(other, tmp_path / "fresh")
    for a, b in zip(moved["written"], fresh["written"]):
        assert json.loads(a.read_text())["metrics"] == json.loads(b.read_text())["metrics"]
        pd.testing.assert_frame_equal(_predictions(a), _predictions(b))

    images[0].write_bytes(contents[0])  # one file changed in place: same name, same root
    again = run(other, shared)
    assert not again["written"], "nothing to redo: the records exist"
    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[linear-probe]", f"data.rsna.root={other}"))
    redo = evaluate(cfg, build_method(cfg, 0), random_init_subject(cfg), ResultsStore(shared), CPU, force=True)
    assert redo["encoder_passes"], "a changed image invalidates the cached features"


def test_records_do_not_depend_on_how_seeds_are_split_over_processes(tiny_cfg, tmp_path):
    extra = ("eval.datasets=[rsna]", "eval.protocols=[zero-shot,linear-probe]")

    def names(results: Path, *seed_lists: str) -> list[str]:
        for seeds in seed_lists:
            cfg = tiny_cfg(extra=(*extra, f"eval.seeds={seeds}"))
            evaluate(cfg, build_method(cfg, 0), random_init_subject(cfg), ResultsStore(results), CPU)
        return sorted(p.name for p in results.glob("records/*/*.json"))

    together = names(tmp_path / "one", "[1,2,3]")
    apart = names(tmp_path / "three", "[1]", "[2]", "[3]")
    assert together == apart
    assert len(together) == 4, "zero-shot is one record per model and dataset; the probe one per seed"


def test_a_truncated_record_is_evaluated_again(tiny_cfg, capsys):
    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot]"))
    store, subject = ResultsStore(cfg.results_dir), random_init_subject(cfg)
    (path,) = evaluate(cfg, build_method(cfg, 0), subject, store, CPU)["written"]
    whole = path.read_text()
    path.write_text(whole[:len(whole) // 2])  # what a crash of the machine can leave
    assert evaluate(cfg, build_method(cfg, 0), subject, store, CPU)["written"] == [path]
    assert "is not a finished record (not JSON, or cut short); evaluating it again" in capsys.readouterr().err
    assert json.loads(path.read_text())["metrics"] == json.loads(whole)["metrics"]


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = {"live": f".a.json~{HOST}~{os.getpid()}~00000000.tmp", "dead": f".b.json~{HOST}~{dead.pid}~00000000.tmp",
             "other-host": f".c.json~elsewhere~{dead.pid}~00000000.tmp", "legacy": ".d.pt.x1y2z3.tmp",
             "record": "e.json"}
    for name in files.values():
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [files["dead"]]
    assert {p.name for p in remove_stale_temporaries(tmp_path, locked=True)} == {files["other-host"], files["legacy"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files["live"], files["record"]])
    atomic_write_text(tmp_path / "e.json", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files["live"], files["record"]])


def test_two_processes_given_one_pretraining_do_it_once_and_a_killed_holder_is_taken_over(data_home, tmp_path):
    """B waits for A's lock; A is killed mid-training; B takes the run over, removes what killed writes left in
    the run folder, resumes and finishes: one metrics row per step, every record once."""
    results = tmp_path / "results"
    exe = os.path.join(os.path.dirname(sys.executable), "bench")
    args = [exe, "run", "--method", "clip", "--no-table", "--results-dir", str(results), *TINY, "trainer.budget.epochs=6",
            "runtime.threads=1", "eval.datasets=[rsna]", "eval.protocols=[zero-shot]",
            "eval.random_init_baseline=false"]
    a = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(results.glob("runs/*/metrics.jsonl")):
        assert a.poll() is None, a.stderr.read()
        time.sleep(0.05)
    run_dir = run_dir_of(results)
    b = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    waited = ""
    while "waiting for it" not in waited:
        line = b.stderr.readline()
        assert line, f"B ended without waiting: {waited}"
        waited += line
    assert a.poll() is None, "A finished before B asked for the run; nothing was tested"
    stale = [run_dir / ".checkpoint.pt.k1ll3d.tmp", run_dir / f".checkpoint.pt~{HOST}~{a.pid}~0badf00d.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    a.send_signal(signal.SIGKILL)
    a.wait()
    rest = b.communicate(timeout=600)[1]
    assert b.returncode == 0, rest
    assert "removed .checkpoint.pt.k1ll3d.tmp" in rest
    assert not any(p.exists() for p in stale) and not list(run_dir.glob(".*.tmp"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and (run_dir / "final.pt").exists()
    assert len(list(results.glob("records/*/*.json"))) == 1
    locks = list(results.glob("locks/*.lock"))
    assert locks and all(FileLock(path, "test").try_acquire() for path in locks), "every lock was released"

