"""The results store: one JSON record per evaluation plus a predictions CSV, written atomically.

Layout under the results root:
    records/<method>/<key>.json           one evaluation (schema below)
    records/<method>/<key>.predictions.csv.gz
    runs/<method>-<ablation>-<pretrain hash>-seed<k>/   checkpoints, metrics.jsonl, config.yaml
    locks/                                 one lock file per run and record ever computed (safe to delete when
                                           nothing runs)

A record's key names (method, ablation, pretrain hash, pretrain seed, dataset, protocol, fraction, eval
seed, eval-settings hash), so re-running finds finished work and parallel workers never collide.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.core.errors import UserError
from bench.core.io import FileLock, atomic_write, atomic_write_json, remove_stale_temporaries, temporary_name

RANDOM_INIT = "random-init"  # the method name of a model's untrained baseline in records

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

    def check_writable(self) -> None:
        """Refuse, before any work, a results folder that cannot be written (read-only, a file, no space)."""
        probe = temporary_name(self.root / "write-probe")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"results folder {self.root} is not writable ({exc.strerror or exc}); choose another "
                            f"with --results-dir") from None

    def record_path(self, key: RecordKey) -> Path:
        return self.root / "records" / key.method / f"{key.stem}.json"

    def exists(self, key: RecordKey, report: bool = True) -> bool:
        """Whether the record is finished: a whole record with its predictions beside it. A file that is not
        (truncated by a crash or a full disk, or edited) is reported (unless not `report`), and its evaluation
        is done again."""
        path = self.record_path(key)
        if not path.exists():
            return False
        _, problem = read_record(path)
        if problem is None and not (path.parent / f"{key.stem}.predictions.csv.gz").exists():
            problem = "its predictions file is missing"
        if problem is not None and report:
            print(f"bench: {path} is not a finished record ({problem}); evaluating it again", file=sys.stderr)
        return problem is None

    def lock(self, name: str, what: str) -> FileLock:
        """The lock of one piece of work (a pretraining run, a record), so two processes given it do it once;
        lock files live in `<root>/locks/`."""
        return FileLock(self.root / "locks" / f"{name}.lock", what)

    def claim(self, key: RecordKey) -> FileLock:
        return self.lock(f"record-{key.method}-{key.stem}", f"the evaluation {key.method}/{key.stem}")

    def write(self, key: RecordKey, record: dict, predictions: pd.DataFrame) -> Path:
        path = self.record_path(key)
        remove_stale_temporaries(path.parent)
        pred_path = path.with_name(f"{key.stem}.predictions.csv.gz")
        # predictions first: a record on disk always has its predictions beside it
        atomic_write(pred_path, lambda fh: predictions.to_csv(fh, index=False, compression="gzip"))
        atomic_write_json(path, {"schema": SCHEMA_VERSION, **key.__dict__, **record,
                                 "predictions_file": pred_path.name})
        return path

    def records(self) -> list[dict]:
        """Every readable record; a `*.json` file that is not one (unreadable, foreign, truncated) is named on
        stderr and left out, so one damaged file does not hide the rest."""
        out = []
        for path in sorted((self.root / "records").glob("*/*.json")):
            rec, problem = read_record(path)
            if problem is not None:
                print(f"bench: skipped {path}: not a results record ({problem})", file=sys.stderr)
                continue
            rec["record_path"] = str(path)
            out.append(rec)
        return out

    def run_dir(self, method: str, ablation: str, pretrain_hash: str, seed: int) -> Path:
        return self.root / "runs" / f"{method}-{ablation}-{pretrain_hash[:10]}-seed{seed}"


REQUIRED = ("schema", *RecordKey.__dataclass_fields__, "metrics", "predictions_file")


def read_record(path: Path) -> tuple[dict | None, str | None]:
    """(the record at `path`, None), or (None, what keeps the file from being a results record)."""
    try:
        rec = json.loads(path.read_bytes())
    except OSError as exc:
        return None, exc.strerror or str(exc)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not JSON, or cut short"
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        return None, f"no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    return rec, None
