import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def tree_digest(root: Path) -> str:
    """One hash of every file's relative path and content (gzip members by their content, since the
    gzip header holds a timestamp)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        data = path.read_bytes()
        h.update(str(path.relative_to(root)).encode() + (gzip.decompress(data) if path.suffix == ".gz" else data))
    return h.hexdigest()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def run_dir_of(results_dir) -> Path:
    runs = sorted(Path(results_dir).glob("runs/*/"))
    assert len(runs) == 1, runs
    return runs[0]


def bench_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("bench")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def record_key(i: int, worker: int):
    from bench.core.results import RecordKey

    return RecordKey("clip", "none", "abcdef0123456789", worker, "chexpert", "zero-shot", 1.0, i, "e0e0e0e0")


def write_records(root: str, worker: int, n: int, shared_key: bool) -> None:
    import pandas as pd

    from bench.core.results import ResultsStore

    store = ResultsStore(root)
    for i in range(n):
        key = record_key(0, 0) if shared_key else record_key(i, worker)
        preds = pd.DataFrame({"sample_id": [f"s{j}" for j in range(50)], "score/A": [worker] * 50})
        store.write(key, {"metrics": {"auc": 0.5 + worker / 10}, "payload": "x" * 20000}, preds)
