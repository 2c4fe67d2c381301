import json
import multiprocessing as mp

import pandas as pd
from tests_support import record_key as _key
from tests_support import write_records as _writer

from bench.core.results import ResultsStore


def _two_writers(root, n: int, shared_key: bool) -> None:
    """Two processes writing n records each at the same time (all to one key if `shared_key`)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(root), w, n, shared_key)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    _two_writers(tmp_path, 40, shared_key=False)
    records = ResultsStore(tmp_path).records()
    assert len(records) == 80
    assert sorted((r["pretrain_seed"], r["eval_seed"]) for r in records) == sorted(
        (w, i) for w in (1, 2) for i in range(40))
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files are left behind"


def test_writers_racing_on_one_record_leave_one_whole_record(tmp_path):
    _two_writers(tmp_path, 30, shared_key=True)
    (path,) = list(tmp_path.glob("records/*/*.json"))
    record = json.loads(path.read_text())  # parses: never torn
    assert record["metrics"]["auc"] in (0.6, 0.7)
    preds = pd.read_csv(path.with_name(record["predictions_file"]))
    assert len(preds) == 50


def test_exists_and_record_fields(tmp_path):
    store = ResultsStore(tmp_path)
    key = _key(0, 0)
    assert not store.exists(key)
    store.write(key, {"metrics": {"auc": 0.9}}, pd.DataFrame({"sample_id": ["a"]}))
    assert store.exists(key)
    (rec,) = store.records()
    assert rec["schema"] == 2 and rec["method"] == "clip" and rec["fraction"] == 1.0
