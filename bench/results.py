"""The results store: one JSON record per evaluation plus a predictions CSV, written atomically.

Layout under the results root:
    records/<method>/<key>.json           one evaluation (schema below)
    records/<method>/<key>.predictions.csv.gz
    runs/<method>-<ablation>-<pretrain hash>-seed<k>/   checkpoints, metrics.jsonl, config.yaml

A record's key names (method, ablation, pretrain hash, pretrain seed, dataset, protocol, fraction, eval
seed, eval-settings hash), so re-running finds finished work and parallel workers never collide.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.errors import UserError
from bench.io import atomic_write, atomic_write_json

SCHEMA_VERSION = 2  # 2: bootstrap CIs and replicates, thresholds, timing, fine-tune records


@dataclass(frozen=True)
class RecordKey:
    method: str
    ablation: str
    pretrain_hash: str
    pretrain_seed: int
    dataset: str
    protocol: str
    fraction: float
    eval_seed: int
    eval_hash: str

    @property
    def stem(self) -> str:
        return (f"{self.ablation}__{self.pretrain_hash[:10]}__s{self.pretrain_seed}__{self.dataset}__"
                f"{self.protocol}__f{self.fraction:g}__e{self.eval_seed}__{self.eval_hash[:8]}")


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def record_path(self, key: RecordKey) -> Path:
        return self.root / "records" / key.method / f"{key.stem}.json"

    def exists(self, key: RecordKey) -> bool:
        return self.record_path(key).exists()

    def write(self, key: RecordKey, record: dict, predictions: pd.DataFrame) -> Path:
        path = self.record_path(key)
        pred_path = path.with_name(f"{key.stem}.predictions.csv.gz")
        # predictions first: a record on disk always has its predictions beside it
        atomic_write(pred_path, lambda fh: predictions.to_csv(fh, index=False, compression="gzip"))
        atomic_write_json(path, {"schema": SCHEMA_VERSION, **key.__dict__, **record,
                                 "predictions_file": pred_path.name})
        return path

    def records(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "records").glob("*/*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"{path}: not a readable results record ({exc})") from None
            rec["record_path"] = str(path)
            out.append(rec)
        return out

    def run_dir(self, method: str, ablation: str, pretrain_hash: str, seed: int) -> Path:
        return self.root / "runs" / f"{method}-{ablation}-{pretrain_hash[:10]}-seed{seed}"
