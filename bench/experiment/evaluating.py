"""Evaluating one model: the plan of its records (every configured dataset x protocol x label fraction x
evaluation seed), each written once with its provenance, finished ones skipped, and two processes given the
same record computing it once."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import stable_hash, to_plain
from bench.core.io import file_sha256, remove_stale_temporaries
from bench.core.progress import ItemProgress, display_mode, say
from bench.core.provenance import device_info, git_state, library_versions
from bench.core.registry import PROTOCOLS
from bench.core.results import RANDOM_INIT, RecordKey, ResultsStore
from bench.data.loading import LoadedDataset, load_dataset
from bench.evaluation.features import FeatureCache
from bench.evaluation.protocol import EvalContext, evaluated_datasets, reads_reports, run_protocol
from bench.experiment.config import ABSENT, ablation_changes, flatten_config
from bench.experiment.contamination import pretraining_overlap
from bench.experiment.identity import config_hash, eval_hash, pretrain_hash
from bench.modeling.method import Method
from bench.train import distributed
from bench.train.cost import COST_FILE, UNTRAINED
from bench.train.speed import loader_workers


@dataclass(frozen=True)
class Subject:
    """What is evaluated: the record identity of a model and where its weights came from."""

    method: str
    ablation: str
    pretrain_hash: str
    pretrain_seed: int
    # {"path", "sha256"} of our weights, an external model's identity, an untrained model's weights' digest (or None)
    checkpoint: dict | None
    feature_key: str  # names its folder of cached features: the weights' hash, or the untrained model's


def evaluation_protocols(cfg: DictConfig, joint_space: bool) -> list[str]:
    """The configured protocols this model can be evaluated with (some need a joint image-text space)."""
    return [p for p in cfg.eval.protocols if joint_space or not PROTOCOLS.get(p).needs_joint_space]


def evaluation_plan(cfg: DictConfig, subject: Subject, joint_space: bool) -> list[RecordKey]:
    """The record of every configured dataset x protocol x fraction x seed of one model, in the order they run;
    known without the model's weights, so a plan can count what is left before anything is trained."""
    keys = []
    for dataset in evaluated_datasets(cfg):
        for protocol in evaluation_protocols(cfg, joint_space):
            runs = PROTOCOLS.get(protocol)
            if dataset not in runs.datasets(cfg):
                continue
            for fraction, seed in runs.jobs(runs.fractions(cfg), cfg.eval.seeds):
                keys.append(RecordKey(subject.method, subject.ablation, subject.pretrain_hash, subject.pretrain_seed,
                                      dataset, protocol, fraction, seed, eval_hash(cfg, protocol, dataset)))
    return keys


def evaluate(cfg: DictConfig, method: torch.nn.Module, subject: Subject, store: ResultsStore, device: torch.device,
             force: bool = False, provenance: dict | None = None) -> dict:
    """Every configured dataset x protocol x fraction x seed for one model; finished records are skipped
    unless `force`. `provenance` is added to every record (e.g. the sweep a model came from). Returns the
    written record paths and where the time went. Progress shows on stderr as `runtime.progress` says: how
    many records run and how many are there, then each finished one with its headline metric and the ETA.

    Under torchrun (joined by `experiment.setup.start`) every rank evaluates (fine-tuning trains one DDP
    model) and rank 0 writes the records."""
    skipped = [p for p in cfg.eval.protocols if p not in evaluation_protocols(cfg, method.joint_space)]
    if skipped:
        print(f"bench: {subject.method} has no joint image-text space; {', '.join(skipped)} "
              f"{'is' if len(skipped) == 1 else 'are'} not evaluated", file=sys.stderr)
    for protocol in cfg.eval.protocols:
        runs = PROTOCOLS.get(protocol)
        if not runs.datasets(cfg):
            print(f"bench: {protocol} runs on datasets that provide {' or '.join(sorted(runs.requires))}; none of "
                  f"its datasets does, so it is not evaluated", file=sys.stderr)
    workers = loader_workers(cfg.runtime.num_workers, device)
    features = FeatureCache(store.root / "features" / subject.feature_key if cfg.eval.cache_features else None,
                            int(cfg.eval.batch_size), device, workers)
    written, timing = [], {"encode_s": 0.0, "fit_s": 0.0, "fine_tune_s": 0.0, "bootstrap_s": 0.0, "total_s": 0.0}
    loaded: dict[str, LoadedDataset] = {}
    # the corpus sources rank 0 alone reads for `contamination`: apart from `loaded`, which every rank fills alike
    overlaps: dict[str, list[dict] | None] = {}
    sources: dict[str, LoadedDataset] = {}
    changes = ablation_record(cfg, subject)
    if changes is not None:
        provenance = {**(provenance or {}), "ablation_changes": changes}
    keys = evaluation_plan(cfg, subject, method.joint_space)
    # counted before the first record runs, so that progress can say how many are left from the start
    finished = [not force and distributed.agree(store.exists(key, report=distributed.is_main())) for key in keys]
    mode = display_mode(cfg.runtime.progress, main=distributed.is_main())
    if keys:
        to_do, there = finished.count(False), finished.count(True)
        say(mode, f"{subject.method}/{subject.ablation} seed {subject.pretrain_seed}: " + (
            f"{to_do} record(s) to evaluate, {there} already there" if to_do else
            f"all {there} record(s) already there"))
    progress = ItemProgress(mode, finished.count(False))
    try:
        for key, done in zip(keys, finished):
            if done:
                continue
            # another process given the same work may be doing this record: wait for it and use its record
            with distributed.holding(store.claim(key)):
                if distributed.agree(store.exists(key, report=False)) and not force:
                    progress.done_elsewhere()
                    continue
                progress.begin(record_label(key))
                path, spent, outcome = _evaluate_one(cfg, method, subject, key, store, loaded, features, device,
                                                     workers, provenance, overlaps, sources)
            progress.finish(outcome)
            if path is not None:
                written.append(path)
            for k, v in spent.items():
                timing[k] = timing.get(k, 0.0) + v
    finally:
        progress.close()
    return {"written": written, "timing": timing, "encoder_passes": dict(features.encoded)}


def _evaluate_one(cfg: DictConfig, method: torch.nn.Module, subject: Subject, key: RecordKey, store: ResultsStore,
                  loaded: dict[str, LoadedDataset], features: FeatureCache, device: torch.device, workers: int,
                  provenance: dict | None, overlaps: dict[str, list[dict] | None],
                  sources: dict[str, LoadedDataset]) -> tuple[Path | None, dict[str, float], str]:
    """One record: (its path, None on ranks other than 0; where the time went; its headline metric, as
    `headline` shows it)."""
    reports = reads_reports(key.protocol, key.dataset)
    name = f"{key.dataset} with reports" if reports else key.dataset
    if name not in loaded:
        with distributed.main_first():
            loaded[name] = load_dataset(cfg, key.dataset, with_reports=reports)
    data = loaded[name]
    if key.dataset not in overlaps:  # rank 0 writes the records, and alone reads the corpus to fill them
        overlaps[key.dataset] = contamination(cfg, subject, data, sources) if distributed.is_main() else None
    data.splits.used.clear()
    data.skipped.clear()
    started, encoded = time.perf_counter(), features.seconds
    ctx = EvalContext(method, data, cfg, device, features, workers)
    # a protocol that keeps state (fine-tuning's checkpoints) keeps it here, and resumes from it after a kill
    folder = store.root / "finetune" / key.method / key.stem
    if distributed.is_main() and folder.exists():
        remove_stale_temporaries(folder, locked=True)
    result = run_protocol(ctx, key.protocol, key.fraction, key.eval_seed, folder)
    boot_started = time.perf_counter()
    numbers = result.numbers(cfg.eval.bootstrap)
    spent = {"encode_s": features.seconds - encoded, **result.timing,
             "bootstrap_s": time.perf_counter() - boot_started, "total_s": time.perf_counter() - started}
    task = data.task
    record = {
        **numbers, "task": {"labels": task.labels, "kind": task.kind, "metric": task.metric},
        "config": to_plain(cfg), "config_hash": config_hash(cfg), "checkpoint": subject.checkpoint,
        "cost": model_cost(subject), "contamination": overlaps[key.dataset],
        "splits": {"dir": str(data.splits.directory), "sha256": dict(data.splits.used),
                   "unreadable_skipped": dict(data.skipped)},
        "git": git_state(), "libraries": library_versions(), "device": device_info(device),
        "wall_time_s": round(spent["total_s"], 3), "timing": {k: round(v, 3) for k, v in spent.items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(provenance or {}),
    }
    path = store.write(key, record, result.predictions()) if distributed.is_main() else None
    distributed.barrier()  # every rank is done with what the protocol left in its folder before it goes
    if distributed.is_main():
        PROTOCOLS.get(key.protocol).remove_outputs(cfg, folder)
    return path, spent, headline(numbers["metrics"], task.metric)


def record_label(key: RecordKey) -> str:
    """What a progress line calls a record: its dataset, protocol, label fraction and evaluation seed."""
    return f"{key.dataset} {key.protocol} {key.fraction * 100:g}% seed {key.eval_seed}"


def headline(metrics: dict, metric: str) -> str:
    """A record's main number for its progress line, e.g. `auc 0.812`: the task's metric where the protocol
    reports it, else the protocol's first (segmentation's Dice); empty where there is none."""
    name = metric if metric in metrics else next(iter(metrics), None)
    value = metrics.get(name)
    return f"{name} {value:.3f}" if isinstance(value, (int, float)) else ""


def ablation_record(cfg: DictConfig, subject: Subject) -> dict[str, list] | None:
    """What the trained model's ablation changes ({key: [without, with]}, as `bench list` shows it); None for
    a model that is no ablation of a registered method: the random-init baseline, an external model, a sweep's
    finalized model (named after its study; its parameters are in the record's `sweep`)."""
    if subject.method != cfg.method.name:
        return None
    try:
        changes = ablation_changes(cfg.method.name, cfg.ablation)
    except UserError:
        return None
    # an override of the run may undo what the ablation set: only what this run's config holds is recorded
    held = flatten_config(cfg)
    return {k: [a, b] for k, (a, b) in changes.items() if held.get(k, ABSENT) == b}


def contamination(cfg: DictConfig, subject: Subject, data: LoadedDataset, loaded: dict[str, LoadedDataset]
                  ) -> list[dict] | None:
    """What of `data` the model saw in pretraining (bench.experiment.contamination): nothing for the untrained
    baseline, None (unknown) for an external model."""
    if subject.method == RANDOM_INIT:
        return []
    if subject.method == "external":
        return None
    return pretraining_overlap(cfg, data, loaded)


def model_cost(subject: Subject) -> dict | None:
    """What training the model cost (bench.train.cost): the run's `cost.json` beside its weights, nothing for
    the random-init baseline, None where unknown (an external model, a run trained before costs were kept)."""
    if subject.method == RANDOM_INIT:
        return dict(UNTRAINED)
    path = (subject.checkpoint or {}).get("path")
    cost = Path(path).parent / COST_FILE if path else None
    return json.loads(cost.read_text()) if cost is not None and cost.is_file() else None


def subject_of_run(cfg: DictConfig, checkpoint: Path) -> Subject:
    digest = file_sha256(checkpoint)
    return Subject(cfg.method.name, cfg.ablation, pretrain_hash(cfg), int(cfg.seed),
                   {"path": str(checkpoint), "sha256": digest}, digest[:16])


def evaluated_weights_digest(method: Method) -> str:
    """sha256 of the weights the evaluators read (`Method.evaluated_modules`): names, shapes, dtypes, bytes."""
    return weights_digest(method, set(method.evaluated_modules()))


def weights_digest(method: Method, modules: set[str] | None = None) -> str:
    """sha256 of `method`'s state dict (of the top-level `modules` only, where given): names, shapes, dtypes, bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(method.state_dict().items()):
        if modules is None or name.split(".")[0] in modules:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def random_init_subject(cfg: DictConfig, method: Method | None = None) -> Subject:
    """The pretrained model's exact starting point: same architecture, same seed, no training.

    It is keyed by the method, the model's configuration and the method settings that shape the untrained
    weights the evaluators read (`Method.init_settings`), not by the bits of those weights (they differ
    between CPUs' instruction sets, and a plan is made from the configs alone): every ablation of a method
    that starts from the same weights shares one baseline, evaluated once and shown as one row. Given the
    untrained `method`, the subject also names those weights by digest (the record's `checkpoint`)."""
    from bench.core.registry import METHODS

    own = METHODS.get(cfg.method.name).init_settings
    settings = to_plain(cfg.method) if own is None else \
        to_plain(OmegaConf.create({k: OmegaConf.select(cfg.method, k) for k in own}))
    arch = stable_hash({"method": cfg.method.name, "model": to_plain(cfg.model), "settings": settings})
    weights = None if method is None else {"untrained_weights_sha256": evaluated_weights_digest(method)}
    return Subject(RANDOM_INIT, cfg.method.name, arch, int(cfg.seed), weights, f"random-init-{arch[:12]}-s{cfg.seed}")


def report_timing(subject: Subject, summary: dict, quiet: bool = False) -> None:
    """One line saying where an evaluation's time went; none when `quiet` (`runtime.progress=quiet`)."""
    t = summary["timing"]
    if summary["written"] and not quiet:
        print(f"bench: {subject.method} {subject.ablation}: {len(summary['written'])} record(s) in {t['total_s']:.1f} s "
              f"(encoding {t['encode_s']:.1f}, linear fits {t['fit_s']:.1f}, fine-tuning {t['fine_tune_s']:.1f}, "
              f"bootstrap {t['bootstrap_s']:.1f})", file=sys.stderr)
