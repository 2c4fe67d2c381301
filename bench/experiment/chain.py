"""One experiment as a resumable chain: data -> pretraining -> every (dataset x protocol) evaluation ->
records. Each link skips what is already finished, so re-running the same command after a kill resumes."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.io import atomic_write_text, file_sha256, remove_stale_temporaries
from bench.core.provenance import device_info, git_state, library_versions
from bench.core.registry import get_method
from bench.core.results import RecordKey, ResultsStore
from bench.data.corpus import (
    MixedBatchSampler,
    Pool,
    PretrainCorpus,
    batch_composition,
    corpus_summary,
)
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache, usable
from bench.data.splits import SplitFiles, fraction_file, materialise
from bench.datasets import Task, get_adapter
from bench.evaluation import FITS_LABELS, EvalContext, FeatureCache, run_protocol
from bench.evaluation.protocols.fine_tune import remove_weights
from bench.experiment.config import (
    config_hash,
    corpus_sources,
    dataset_settings,
    eval_hash,
    pretrain_hash,
    stable_hash,
    to_plain,
)
from bench.modeling.label_prompts import check_templates, label_prompt
from bench.modeling.method import Method
from bench.train import distributed
from bench.train.speed import Speed, loader_workers
from bench.train.trainer import Trainer, Validation, resolve_device, seed_everything

RANDOM_INIT = "random-init"


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def dataset_root(cfg: DictConfig, name: str) -> Path:
    """The dataset's configured root, or its copy in the synthetic benchmark (generated on first use)."""
    settings = dataset_settings(cfg, name)
    if settings.root is not None:
        return Path(os.path.expanduser(str(settings.root)))
    from bench.data.synth import dataset_dir, ensure_synthetic

    syn = cfg.data.synthetic
    root = ensure_synthetic(Path(os.path.expanduser(syn.root)), syn.size, int(syn.seed))
    return root / dataset_dir(get_adapter(name).config_key or name)


@dataclass
class LoadedDataset:
    """A dataset ready to evaluate or train on: its manifest, task and frozen split files, and the image
    cache and preprocessing of the model preset."""

    name: str
    manifest: pd.DataFrame
    task: Task
    splits: SplitFiles
    cache: ImageCache
    image_cfg: DictConfig
    corrupt_images: str = "skip"
    decode_workers: int = 1
    skipped: dict[str, int] = field(default_factory=dict)  # split file -> unreadable images left out
    _usable: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def rows(self, split: str, fraction: float = 1.0, subset_seed: int | None = None) -> pd.DataFrame:
        """The split's rows (a label fraction's, for train) whose images can be read: each is decoded into
        the cache now if it is not there yet, so no epoch meets an unreadable file."""
        rows = self.splits.rows(split, fraction, subset_seed)
        name = fraction_file(fraction, subset_seed) if split == "train" else f"{split}.txt"
        if name not in self._usable:  # checked once per split file: every fraction x seed asks again
            self._usable[name] = usable(self.cache, rows["image_path"], self.corrupt_images, f"{self.name} {split}",
                                        self.decode_workers)
        ok = self._usable[name]
        self.skipped[name] = int((~ok).sum())
        return rows[ok].reset_index(drop=True)

    def preprocessor(self, augment: bool) -> ImagePreprocessor:
        image = self.image_cfg
        return ImagePreprocessor(image.image_size, image.mean, image.std, augment, image.get("channels", 3))


def load_dataset(cfg: DictConfig, name: str, with_reports: bool = False) -> LoadedDataset:
    adapter = get_adapter(name)(dataset_root(cfg, name), dataset_settings(cfg, name))
    manifest = adapter.read(with_reports=with_reports)
    if manifest.empty:
        raise UserError(f"{name}: no usable samples under {adapter.root}")
    splits = materialise(manifest, adapter.task, name, cfg.data.splits_dir)
    workers = cfg.runtime.get("decode_workers") or os.cpu_count() or 1
    return LoadedDataset(name, manifest, adapter.task, splits, ImageCache(cfg.data.cache_dir,
                         int(cfg.model.image.image_size)), cfg.model.image, cfg.data.corrupt_images, int(workers))


def build_method(cfg: DictConfig, seed: int) -> Method:
    seed_everything(seed)
    return get_method(cfg.method.name)(cfg)


def _labelled_images(cfg: DictConfig, name: str, cache: ImageCache, workers: int) -> tuple[pd.DataFrame, list[str]]:
    """The readable training images of a labelled dataset with label values as written (uncertain -1 and
    blank kept where the adapter has an uncertainty policy), for prompts."""
    settings = to_plain(dataset_settings(cfg, name))
    if "uncertain_policy" in settings:
        settings["uncertain_policy"] = "keep"
    adapter = get_adapter(name)(dataset_root(cfg, name), OmegaConf.create(settings))
    manifest = adapter.read(with_reports=False)
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    if train.empty:
        raise UserError(f"{name}: no training images under {adapter.root} for the image-only corpus")
    ok = usable(cache, train["image_path"], cfg.data.corrupt_images, f"{name} train (image-only)", workers)
    return train[ok].reset_index(drop=True), adapter.task.labels


def corpus_channels(image: DictConfig) -> int:
    """Channels of the pretraining corpus's images. A grey preset's (one mean, one std) are copies of one
    channel: the corpus ships that one and the image tower repeats it on the device, a third of the bytes for
    the loader to normalise, collate, pin and copy."""
    grey = not OmegaConf.is_list(image.mean) and not OmegaConf.is_list(image.std)
    return 1 if grey else int(image.get("channels", 3))


def corpus_prompt(cfg: DictConfig) -> Callable[[dict], str] | None:
    """The method's disease-kind prompt writer for image-only samples (label values -> text), or None."""
    if not cfg.method.get("prompts", {}).get("enabled", False):
        return None
    p = cfg.method.prompts
    return partial(label_prompt, templates=check_templates(p.templates), names=to_plain(p.names),
                   negatives=bool(p.negatives))


def build_corpus(cfg: DictConfig, seed: int) -> tuple[PretrainCorpus, MixedBatchSampler, dict]:
    """The pretraining corpus of the method's sources (data.corpus), its batch sampler, and a summary."""
    image = cfg.model.image
    cache = ImageCache(cfg.data.cache_dir, int(image.image_size))
    workers = int(cfg.runtime.get("decode_workers") or os.cpu_count() or 1)
    pools: dict[str, Pool] = {}
    for kind, names in corpus_sources(cfg).items():
        parts = []
        for name in names:
            if kind == "image_only":
                rows, labels = _labelled_images(cfg, name, cache, workers)
                parts.append((name, rows, rows[labels]))
                continue
            data = load_dataset(cfg, name, with_reports=True)
            if "report" not in data.manifest.columns:
                raise UserError(f"{name} has no reports, so it cannot be a {kind} source of data.corpus")
            # a text-only source's images are never read, so they are not decoded either
            rows = data.rows("train") if kind == "paired" else data.splits.rows("train")
            parts.append((name, rows, None))
        if not parts:
            continue
        ids = [f"{name}:{i}" for name, rows, _ in parts for i in rows["sample_id"]]
        pools[kind] = Pool(
            kind, [name for name, _, _ in parts], ids,
            paths=None if kind == "text_only" else [p for _, rows, _ in parts for p in rows["image_path"]],
            texts=None if kind == "image_only" else [t for _, rows, _ in parts for t in rows["report"]],
            labels=pd.concat([lab for _, _, lab in parts], ignore_index=True) if kind == "image_only" else None)
    preprocess = ImagePreprocessor(image.image_size, image.mean, image.std, True, corpus_channels(image))
    corpus = PretrainCorpus(pools, preprocess, cache, seed, corpus_prompt(cfg))
    # trainer.batch_size is the global batch: under torchrun every rank gets the same share of every kind
    batch_size, world = int(cfg.trainer.batch_size), distributed.world_size()
    if batch_size % world:
        raise UserError(f"trainer.batch_size={batch_size} is the global batch; it must be divisible by the "
                        f"{world} processes")
    mix = to_plain(cfg.data.corpus.mix)
    per_batch = {k: world * n for k, n in batch_composition(batch_size // world, mix, corpus.sizes).items()}
    alone = batch_composition(batch_size, mix, corpus.sizes)
    if per_batch != alone and distributed.is_main():
        print(f"bench: a batch over {world} processes holds {per_batch} (in one process it would be {alone}): "
              f"each kind's count is rounded to a multiple of {world}", file=sys.stderr)
    sampler = MixedBatchSampler(corpus.sizes, per_batch, seed)
    return corpus, sampler, corpus_summary(corpus.pools, per_batch)


def pretrain(cfg: DictConfig, store: ResultsStore, device: torch.device, validation: Validation | None = None
             ) -> tuple[Method, Path]:
    """Train (or resume, or reuse) the run of `cfg`; `validation` is called after every epoch (a sweep reports
    to its pruner there) and does not change what is trained.

    A process that finds another one training the same run waits for it and reuses its weights (a lock next
    to the run; the kernel releases a killed holder's). The holder removes what killed writes left there."""
    phash = pretrain_hash(cfg)
    run_dir = store.run_dir(cfg.method.name, cfg.ablation, phash, cfg.seed)
    final = run_dir / "final.pt"
    method = build_method(cfg, cfg.seed)
    if not distributed.agree(final.exists()):
        with distributed.holding(store.lock(f"run-{run_dir.name}", f"pretraining {run_dir.name}")):
            if not distributed.agree(final.exists()):
                _train(cfg, method, run_dir, device, validation)
    method.load_state_dict(torch.load(final, map_location="cpu", weights_only=False)["model"])
    return method.to(device), final


def _train(cfg: DictConfig, method: Method, run_dir: Path, device: torch.device, validation: Validation | None
           ) -> None:
    with distributed.main_first():  # rank 0 generates and decodes the data; the others then find it cached
        corpus, sampler, summary = build_corpus(cfg, cfg.seed)
    if distributed.is_main():  # the run folder appears once the corpus is known to fill a batch
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(run_dir, locked=True):
            print(f"bench: removed {stale.name}, left in {run_dir} by a killed write", file=sys.stderr)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_text(run_dir / "corpus.json", json.dumps(summary, indent=2) + "\n")
    method.prepare(corpus)
    trainer = Trainer(cfg.trainer, run_dir, device, cfg.runtime.progress,
                      loader_workers(cfg.runtime.num_workers, device), Speed.resolve(cfg.runtime.speed, device))
    trainer.fit(method, corpus, method.make_collate(), sampler, cfg.seed, validation)


@dataclass(frozen=True)
class Subject:
    """What is evaluated: the record identity of a model and where its weights came from."""

    method: str
    ablation: str
    pretrain_hash: str
    pretrain_seed: int
    checkpoint: dict | None  # {"path", "sha256"} of our weights, an external model's identity, None if untrained
    feature_key: str  # names its folder of cached features: the weights' hash, or the untrained model's


def evaluation_jobs(cfg: DictConfig, protocol: str) -> list[tuple[float, int]]:
    """(label fraction, eval seed) pairs of a protocol. Zero-shot fits nothing and draws nothing, so it is one
    record per model and dataset, whatever eval.seeds holds and however the seeds are split over processes;
    its record's eval seed is always 0."""
    if protocol not in FITS_LABELS:
        return [(1.0, 0)]
    return [(float(f), int(s)) for f in cfg.eval.fractions for s in cfg.eval.seeds]


def evaluation_protocols(cfg: DictConfig, joint_space: bool) -> list[str]:
    """The configured protocols this model can be evaluated with (zero-shot needs a joint space)."""
    return [p for p in cfg.eval.protocols if joint_space or p != "zero-shot"]


def evaluation_plan(cfg: DictConfig, subject: Subject, joint_space: bool) -> list[RecordKey]:
    """The record of every configured dataset x protocol x fraction x seed of one model, in the order they run;
    known without the model's weights, so a plan can count what is left before anything is trained."""
    keys = []
    for dataset in cfg.eval.datasets:
        for protocol in evaluation_protocols(cfg, joint_space):
            for fraction, seed in evaluation_jobs(cfg, protocol):
                keys.append(RecordKey(subject.method, subject.ablation, subject.pretrain_hash, subject.pretrain_seed,
                                      dataset, protocol, fraction, seed, eval_hash(cfg, protocol, dataset)))
    return keys


def evaluate(cfg: DictConfig, method: Method, subject: Subject, store: ResultsStore, device: torch.device,
             force: bool = False, provenance: dict | None = None) -> dict:
    """Every configured dataset x protocol x fraction x seed for one model; finished records are skipped
    unless `force`. `provenance` is added to every record (e.g. the sweep a model came from). Returns the
    written record paths and where the time went.

    Under torchrun every rank evaluates (fine-tuning trains one DDP model) and rank 0 writes the records."""
    distributed.init_from_env()
    if "zero-shot" in cfg.eval.protocols and not method.joint_space:
        print(f"bench: {subject.method} has no joint image-text space; zero-shot is not evaluated", file=sys.stderr)
    workers = loader_workers(cfg.runtime.num_workers, device)
    features = FeatureCache(store.root / "features" / subject.feature_key if cfg.eval.cache_features else None,
                            int(cfg.eval.batch_size), device, workers)
    written, timing = [], {"encode_s": 0.0, "fit_s": 0.0, "fine_tune_s": 0.0, "bootstrap_s": 0.0, "total_s": 0.0}
    loaded: dict[str, LoadedDataset] = {}
    for key in evaluation_plan(cfg, subject, method.joint_space):
        if distributed.agree(store.exists(key, report=distributed.is_main())) and not force:
            continue
        # another process given the same work may be doing this record: wait for it and use its record
        with distributed.holding(store.claim(key)):
            if distributed.agree(store.exists(key, report=False)) and not force:
                continue
            path, spent = _evaluate_one(cfg, method, subject, key, store, loaded, features, device, workers,
                                        provenance)
        if path is not None:
            written.append(path)
        for k, v in spent.items():
            timing[k] = timing.get(k, 0.0) + v
    return {"written": written, "timing": timing, "encoder_passes": dict(features.encoded)}


def _evaluate_one(cfg: DictConfig, method: Method, subject: Subject, key: RecordKey, store: ResultsStore,
                  loaded: dict[str, LoadedDataset], features: FeatureCache, device: torch.device, workers: int,
                  provenance: dict | None) -> tuple[Path | None, dict[str, float]]:
    """One record: (its path, None on ranks other than 0; where the time went)."""
    if key.dataset not in loaded:
        with distributed.main_first():
            loaded[key.dataset] = load_dataset(cfg, key.dataset)
    data = loaded[key.dataset]
    data.splits.used.clear()
    data.skipped.clear()
    started, encoded = time.perf_counter(), features.seconds
    ctx = EvalContext(method, data, cfg, device, features, workers)
    run_dir = store.root / "finetune" / key.method / key.stem
    if key.protocol == "fine-tune" and distributed.is_main():
        remove_stale_temporaries(run_dir, locked=True)
    result = run_protocol(ctx, key.protocol, key.fraction, key.eval_seed, run_dir)
    boot_started = time.perf_counter()
    numbers = result.numbers(cfg.eval.bootstrap)
    spent = {"encode_s": features.seconds - encoded, **result.timing,
             "bootstrap_s": time.perf_counter() - boot_started, "total_s": time.perf_counter() - started}
    task = data.task
    record = {
        **numbers, "task": {"labels": task.labels, "kind": task.kind, "metric": task.metric},
        "config": to_plain(cfg), "config_hash": config_hash(cfg), "checkpoint": subject.checkpoint,
        "splits": {"dir": str(data.splits.directory), "sha256": dict(data.splits.used),
                   "unreadable_skipped": dict(data.skipped)},
        "git": git_state(), "libraries": library_versions(), "device": device_info(device),
        "wall_time_s": round(spent["total_s"], 3), "timing": {k: round(v, 3) for k, v in spent.items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(provenance or {}),
    }
    path = store.write(key, record, result.predictions()) if distributed.is_main() else None
    if key.protocol == "fine-tune" and not cfg.eval.fine_tune.keep_weights:
        distributed.barrier()  # every rank has loaded the fine-tuned weights before they go
        if distributed.is_main():
            remove_weights(run_dir)
    return path, spent


def subject_of_run(cfg: DictConfig, checkpoint: Path) -> Subject:
    digest = file_sha256(checkpoint)
    return Subject(cfg.method.name, cfg.ablation, pretrain_hash(cfg), int(cfg.seed),
                   {"path": str(checkpoint), "sha256": digest}, digest[:16])


def random_init_subject(cfg: DictConfig) -> Subject:
    """The pretrained model's exact starting point: same architecture, same seed, no training."""
    arch = stable_hash({"method": to_plain(cfg.method), "model": to_plain(cfg.model)})
    return Subject(RANDOM_INIT, cfg.method.name, arch, int(cfg.seed), None, f"random-init-{arch[:12]}-s{cfg.seed}")


def run_folder(spec: str) -> tuple[Path, Path]:
    """(run folder, weights file) of a run folder or of its final.pt / checkpoint.pt."""
    path = Path(spec).expanduser()
    run_dir = path if path.is_dir() else path.parent
    weights = path if path.is_file() else next((run_dir / n for n in ("final.pt", "checkpoint.pt")
                                                if (run_dir / n).exists()), None)
    if not (run_dir / "config.yaml").exists() or weights is None:
        raise UserError(f"{spec}: not a run folder (needs config.yaml and final.pt or checkpoint.pt) and not an "
                        f"external model spec (open_clip:MODEL[:PRETRAINED] or hf-hub:ORG/REPO)")
    return run_dir, weights


EVAL_OVERRIDES = ("eval.", "data.", "runtime.")  # what `bench eval` may set: not how the model was made


def load_checkpoint(spec: str, overrides: list[str], open_clip_config: str | None = None
                    ) -> tuple[DictConfig, Method, Subject]:
    """A model to evaluate: one of our runs (its own model/method/data config), or an open_clip-format CLIP model
    (its own preprocessing); the eval and runtime settings are the defaults with `overrides`, which may set
    eval.*, data.*, runtime.* and results_dir only (the model's own settings come with it)."""
    from bench.experiment.config import compose_config
    from bench.experiment.config_checks import (
        check_config,
        check_known,
        override_keys,
        plain_config,
    )
    from bench.modeling.external import is_external_spec, load_external

    for item, key in zip(overrides, override_keys(overrides)):
        if "=" not in item or not key:
            raise UserError(f"malformed override {item!r}: expected key=value (e.g. eval.seeds=[0,1,2])")
        if key != "results_dir" and not key.startswith(EVAL_OVERRIDES):
            raise UserError(f"{item!r}: bench eval sets only eval.*, data.*, runtime.* and results_dir; how the model "
                            f"was made ({key.split('.')[0]}) comes from its checkpoint")
    if is_external_spec(spec):
        cfg = compose_config("clip", overrides=overrides)
        model = load_external(spec, open_clip_config, "cpu")
        OmegaConf.set_struct(cfg, False)
        cfg.method = {"name": "external", **model.identity}
        cfg.model.image = model.image_cfg
        digest = stable_hash(model.identity)
        return cfg, model, Subject("external", model.name, digest, 0, dict(model.identity), f"external-{digest[:16]}")
    run_dir, weights = run_folder(spec)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    # the run's model, method and data over today's defaults (settings added since then get their default);
    # how to evaluate is today's `eval` with the overrides, not what the run was evaluated with back then
    for key in ("eval", "runtime", "results_dir"):
        run_cfg.pop(key, None)
    defaults = compose_config(str(run_cfg.method.name))
    OmegaConf.set_struct(defaults, False)
    made = OmegaConf.merge(defaults, run_cfg)
    check_known(override_keys(overrides), plain_config(made))
    try:
        cfg = OmegaConf.merge(made, OmegaConf.from_dotlist(overrides))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's grammar errors: the override is at fault
        raise UserError(f"bad override in {' '.join(overrides)}: {str(exc).strip().splitlines()[0]}") from None
    check_config(cfg, made, reads_corpus=False)
    method = build_method(cfg, int(cfg.seed))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=False)["model"]
        method.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any unreadable or mismatched file gets the same clear message
        raise UserError(f"{weights}: cannot load these weights into {cfg.method.name} ({exc})") from None
    subject = subject_of_run(made, weights)  # the pretraining's identity, whatever the overrides say
    if weights.name != "final.pt":  # an unfinished run's weights are not its pretrained model: another variant
        subject = Subject(subject.method, subject.ablation, stable_hash([subject.pretrain_hash, subject.feature_key]),
                          subject.pretrain_seed, subject.checkpoint, subject.feature_key)
    return cfg, method, subject


def report_timing(subject: Subject, summary: dict) -> None:
    t = summary["timing"]
    if summary["written"]:
        print(f"bench: {subject.method} {subject.ablation}: {len(summary['written'])} record(s) in {t['total_s']:.1f} s "
              f"(encoding {t['encode_s']:.1f}, linear fits {t['fit_s']:.1f}, fine-tuning {t['fine_tune_s']:.1f}, "
              f"bootstrap {t['bootstrap_s']:.1f})", file=sys.stderr)


def run_experiment(cfg: DictConfig, force: bool = False) -> ResultsStore:
    """Pretrain (or resume, or reuse) and evaluate; also evaluate the same architecture untrained."""
    quiet_libraries()
    distributed.init_from_env()
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    device = resolve_device(cfg.runtime.device)
    store = ResultsStore(cfg.results_dir)
    store.check_writable()
    method, final = pretrain(cfg, store, device)
    subject = subject_of_run(cfg, final)
    report_timing(subject, evaluate(cfg, method, subject, store, device, force))
    if cfg.eval.random_init_baseline:
        untrained, subject = build_method(cfg, cfg.seed).to(device), random_init_subject(cfg)
        report_timing(subject, evaluate(cfg, untrained, subject, store, device, force))
    return store
