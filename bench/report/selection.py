"""Which records a table or plot shows, as a tidy frame: the filters (`select_records`, each an error naming
what exists when it matches nothing), one row per record with the metric's value, its stored bootstrap
replicates and the identity of its test set (`load_frame`), and the variants that keep different
configurations apart (`assign_variants`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.core.registry import PROTOCOLS
from bench.core.results import RANDOM_INIT

ROW_KEYS = ["method", "ablation", "variant"]
COL_KEYS = ["dataset", "protocol", "fraction"]


def protocol_rank(protocol: str) -> tuple:
    """Protocols in the registry's order (zero-shot, linear probe, fine-tuning...); one no longer registered
    goes last."""
    orders = {cls.name: cls.order for cls in PROTOCOLS}
    return (orders.get(protocol, float("inf")), protocol)


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`METHOD[:ABLATION][@HASH-PREFIX]` -> (method, ablation or None, pretrain-hash prefix or None)."""
    head, _, variant = spec.strip().partition("@")
    method, _, ablation = head.partition(":")
    if not method:
        raise UserError(f"malformed method spec {spec!r}; expected METHOD[:ABLATION][@HASH]")
    return method, ablation or None, variant or None


def parse_fraction(value: float | str) -> float:
    """0.1, '0.1' or '10%' -> 0.1."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"malformed label fraction {value!r}; use e.g. 0.1 or 10%") from None
    if not 0 < f <= 1:
        raise UserError(f"label fraction {value!r} is not in (0, 1]; use e.g. 0.1 or 10%")
    return f


def fraction_label(f: float) -> str:
    return f"{f * 100:g}%"


def name_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def row_name(method: str, ablation: str) -> str:
    return f"{method}:{ablation}"


def _spec_matches(rec: dict, spec: tuple[str, str | None, str | None]) -> bool:
    method, ablation, variant = spec
    return (rec["method"] == method and (ablation is None or rec["ablation"] == ablation)
            and (variant is None or str(rec.get("pretrain_hash", "")).startswith(variant)))


def keep_pretrain_seeds(records: list[dict], seeds: str | None) -> list[dict]:
    """The records of models pretrained with one of `seeds` ("0,2"; None keeps all). The random-init baseline's
    seed is its model's, so it follows the same filter. A seed no record has is an error naming those present."""
    if seeds is None:
        return records
    try:
        wanted = {int(s) for s in name_list(seeds)}
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1") from None
    present = sorted({int(r["pretrain_seed"]) for r in records if r.get("pretrain_seed") is not None})
    missing = sorted(wanted - set(present))
    if not wanted or missing:
        raise UserError(f"--seeds {seeds}: no records of pretraining seed(s) {', '.join(map(str, missing)) or '-'}; "
                        f"seeds present: {', '.join(map(str, present)) or 'none'}")
    return [r for r in records if r.get("pretrain_seed") is not None and int(r["pretrain_seed"]) in wanted]


def select_records(records: list[dict], protocol: str | None = None, fraction: float | str | None = None,
                   datasets: str | Sequence[str] | None = None,
                   methods: str | Sequence[str] | None = None) -> list[dict]:
    """The records the filters keep. A filter that matches nothing is an error naming what exists.

    `methods` are METHOD[:ABLATION][@HASH] specs; the random-init baseline of a selected method is kept too."""
    if not records:
        raise UserError("no results records found; run `bench run --method clip` first or pass --results-dir")
    out = list(records)
    applied: list[str] = []

    def where() -> str:
        return f" (with {', '.join(applied)})" if applied else ""

    wanted = name_list(datasets)
    if wanted:
        present = sorted({r["dataset"] for r in out})
        unknown = [d for d in wanted if d not in present]
        if unknown:
            raise UserError(f"no records for dataset(s) {', '.join(unknown)}{where()}; "
                            f"datasets present: {', '.join(present)}")
        out = [r for r in out if r["dataset"] in wanted]
        applied.append(f"datasets {','.join(wanted)}")
    if protocol:
        present = sorted({r["protocol"] for r in out}, key=protocol_rank)
        if protocol not in present:
            raise UserError(f"no records for protocol {protocol!r}{where()}; protocols present: {', '.join(present)}")
        out = [r for r in out if r["protocol"] == protocol]
        applied.append(f"protocol {protocol}")
    if fraction is not None:
        f = parse_fraction(fraction)
        present = sorted({float(r.get("fraction", 1.0)) for r in out})
        if not any(math.isclose(f, p) for p in present):
            raise UserError(f"no records at label fraction {fraction_label(f)}{where()}; fractions present: "
                            f"{', '.join(fraction_label(p) for p in present)}")
        out = [r for r in out if math.isclose(float(r.get("fraction", 1.0)), f)]
        applied.append(f"fraction {fraction_label(f)}")
    specs = [parse_spec(s) for s in name_list(methods)]
    if specs:
        present = sorted({row_name(r["method"], r["ablation"]) for r in out})
        unknown = [s for s in name_list(methods) if not any(_spec_matches(r, parse_spec(s)) for r in out)]
        if unknown:
            raise UserError(f"no records for method(s) {', '.join(unknown)}{where()}; "
                            f"methods present (method:ablation): {', '.join(present)}")
        chosen = {s[0] for s in specs}
        out = [r for r in out if any(_spec_matches(r, s) for s in specs)
               or (r["method"] == RANDOM_INIT and r["ablation"] in chosen)]
    return out


def _number(value) -> float:
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def prompt_set_key(record: dict, name: str) -> str | None:
    """The key of `record["prompt_sets"]` that `name` means: the exact key, or the one key `name@vK`."""
    sets = record.get("prompt_sets") or {}
    if name in sets:
        return name
    matches = [k for k in sets if k.split("@")[0] == name]
    if len(matches) > 1:
        raise UserError(f"prompt set {name!r} is ambiguous in {record.get('record_path', 'a record')}: "
                        f"{', '.join(matches)}; name the version, e.g. --prompt-set {matches[0]}")
    return matches[0] if matches else None


def load_frame(records: list[dict], metric: str, prompt_set: str | None = None) -> pd.DataFrame:
    """One row per record: its identity, the metric's value (NaN when absent), the stored bootstrap replicates
    and CI of that metric (None when absent), the test set's identity, the predictions file and the classes
    too rare in the test split for reliable statistics ({class: {"positives", "negatives"}}; {} when absent),
    what of the dataset its model saw in pretraining (`contamination`, [] when clean or not known) and what its
    model cost (`cost`, None when not known)."""
    rows = []
    for r in records:
        boot = r.get("bootstrap") or {}
        value = (r.get("metrics") or {}).get(metric)
        reps = (boot.get("replicates") or {}).get(metric)
        ci = (boot.get("ci") or {}).get(metric)
        pred = (Path(r["record_path"]).parent / r["predictions_file"]
                if r.get("record_path") and r.get("predictions_file") else None)
        pset = None
        if prompt_set and r["protocol"] == "zero-shot":
            sets = r.get("prompt_sets") or {}
            pset = prompt_set_key(r, prompt_set)
            value = (sets.get(pset) or {}).get(metric) if pset else None
            if pset is None or pset != next(iter(sets), None):
                reps = ci = pred = None  # replicates and predictions are the primary prompt set's
        rows.append({
            "method": r["method"], "ablation": r["ablation"], "pretrain_hash": str(r.get("pretrain_hash", "")),
            "eval_hash": str(r.get("eval_hash", "")), "dataset": r["dataset"], "protocol": r["protocol"],
            "fraction": float(r.get("fraction", 1.0)), "pretrain_seed": r.get("pretrain_seed"),
            "eval_seed": r.get("eval_seed"), "value": _number(value),
            "replicates": None if reps is None else np.asarray(reps, dtype=float),
            "stored_ci": None if ci is None or any(c is None for c in ci) else (float(ci[0]), float(ci[1])),
            "confidence": float(boot.get("confidence", 0.95)),
            "test_ids": boot.get("test_ids_sha256"),
            "resampling": (boot.get("resamples"), boot.get("seed")) if boot else None,
            "predictions": pred, "prompt_set": pset, "record_path": r.get("record_path"),
            "rare_classes": r.get("rare_classes") or {},
            "contamination": r.get("contamination") or [], "cost": r.get("cost"),
        })
    return pd.DataFrame(rows, columns=[
        "method", "ablation", "pretrain_hash", "eval_hash", "dataset", "protocol", "fraction", "pretrain_seed",
        "eval_seed", "value", "replicates", "stored_ci", "confidence", "test_ids", "resampling", "predictions",
        "prompt_set", "record_path", "rare_classes", "contamination", "cost"])


def assign_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `variant`: empty unless one method/ablation has several pretrain hashes (then the hash prefix), or one
    cell holds several eval-settings hashes (then also `eval <hash>`): different configurations never pool."""
    frame = frame.copy()
    if frame.empty:
        frame["variant"] = []
        return frame
    several = frame.groupby(["method", "ablation"])["pretrain_hash"].transform("nunique") > 1
    evals = frame.groupby(["method", "ablation", "pretrain_hash", *COL_KEYS])["eval_hash"].transform("nunique") > 1
    frame["variant"] = [" ".join(p for p in (ph[:8] if s else "", f"eval {eh[:8]}" if e else "") if p)
                        for ph, eh, s, e in zip(frame.pretrain_hash, frame.eval_hash, several, evals)]
    return frame


def metrics_present(records: list[dict]) -> list[str]:
    return sorted({m for r in records for m in (r.get("metrics") or {})}
                  | {m for r in records for s in (r.get("prompt_sets") or {}).values() for m in s})


def selected_frame(records: list[dict], metric: str = "auc", protocol: str | None = None, *,
                   fraction: float | str | None = None, datasets: str | Sequence[str] | None = None,
                   methods: str | Sequence[str] | None = None, prompt_set: str | None = None,
                   notes: list[str] | None = None) -> pd.DataFrame:
    """Filters + checks + `load_frame` + `assign_variants`: the loader as the table and the plots use it.
    Errors name what exists; `notes` collects what the reader should know."""
    selected = select_records(records, protocol, fraction, datasets, methods)
    present = metrics_present(selected)
    if metric not in present:
        raise UserError(f"no record has metric {metric!r}; metrics present: {', '.join(present) or 'none'}")
    if prompt_set:
        zero = [r for r in selected if r["protocol"] == "zero-shot"]
        if not zero and notes is not None:
            notes.append(f"--prompt-set {prompt_set}: no zero-shot records selected; ignored")
        elif zero and not any(prompt_set_key(r, prompt_set) for r in zero):
            sets = sorted({k for r in zero for k in (r.get("prompt_sets") or {})})
            raise UserError(f"no zero-shot record has prompt set {prompt_set!r}; prompt sets present: "
                            f"{', '.join(sets) or 'none'}")
    frame = assign_variants(load_frame(selected, metric, prompt_set))
    frame.attrs["metrics_present"] = present
    return frame


def row_label(method: str, ablation: str, variant: str = "") -> str:
    return f"{method}:{ablation}" + (f" {variant}" if variant else "")
