"""One experiment as a resumable chain: data -> pretraining -> every (dataset x protocol) evaluation ->
records. Each link skips what is already finished, so re-running the same command after a kill resumes."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.config import (config_hash, corpus_sources, dataset_settings, eval_hash, pretrain_hash, stable_hash,
                          to_plain)
from bench.corpus import MixedBatchSampler, Pool, PretrainCorpus, batch_composition, corpus_summary
from bench.data import ImagePreprocessor
from bench.datasets import Task, get_adapter
from bench.errors import UserError
from bench.evaluation import PROTOCOLS
from bench.images import ImageCache, usable
from bench.io import atomic_write_text
from bench.method import Method
from bench.prompts import check_templates, label_prompt
from bench.provenance import device_info, git_state, library_versions
from bench.registry import get_method
from bench.results import RecordKey, ResultsStore
from bench.splits import SplitFiles, fraction_file, materialise
from bench.trainer import Trainer, resolve_device, seed_everything

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
    from bench.synth import dataset_dir, ensure_synthetic

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

    def rows(self, split: str, fraction: float = 1.0) -> pd.DataFrame:
        """The split's rows (a label fraction's, for train) whose images can be read: each is decoded into
        the cache now if it is not there yet, so no epoch meets an unreadable file."""
        rows = self.splits.rows(split, fraction)
        ok = usable(self.cache, rows["image_path"], self.corrupt_images, f"{self.name} {split}", self.decode_workers)
        self.skipped[fraction_file(fraction) if split == "train" else f"{split}.txt"] = int((~ok).sum())
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
    prompt = None
    if cfg.method.get("prompts", {}).get("enabled", False):
        p = cfg.method.prompts
        prompt = partial(label_prompt, templates=check_templates(p.templates), names=to_plain(p.names),
                         negatives=bool(p.negatives))
    preprocess = ImagePreprocessor(image.image_size, image.mean, image.std, True, image.get("channels", 3))
    corpus = PretrainCorpus(pools, preprocess, cache, seed, prompt)
    per_batch = batch_composition(int(cfg.trainer.batch_size), to_plain(cfg.data.corpus.mix), corpus.sizes)
    sampler = MixedBatchSampler(corpus.sizes, per_batch, seed)
    return corpus, sampler, corpus_summary(corpus.pools, per_batch)


def pretrain(cfg: DictConfig, store: ResultsStore, device: torch.device) -> tuple[Method, Path]:
    phash = pretrain_hash(cfg)
    run_dir = store.run_dir(cfg.method.name, cfg.ablation, phash, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    method = build_method(cfg, cfg.seed)
    final = run_dir / "final.pt"
    if not final.exists():
        corpus, sampler, summary = build_corpus(cfg, cfg.seed)
        atomic_write_text(run_dir / "corpus.json", json.dumps(summary, indent=2) + "\n")
        method.prepare(corpus)
        trainer = Trainer(cfg.trainer, run_dir, device, cfg.runtime.progress, cfg.runtime.num_workers)
        trainer.fit(method, corpus, method.make_collate(), sampler, cfg.seed)
    method.load_state_dict(torch.load(final, map_location="cpu", weights_only=False)["model"])
    return method.to(device), final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(cfg: DictConfig, method: Method, identity: tuple[str, str, str], checkpoint: Path | None,
             store: ResultsStore, device: torch.device, force: bool = False) -> list[Path]:
    """Every configured (dataset x protocol) for one model; finished records are skipped unless `force`."""
    name, ablation, phash = identity
    unknown = [p for p in cfg.eval.protocols if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"unknown protocol(s) {', '.join(unknown)}; valid protocols: {', '.join(PROTOCOLS)}")
    written = []
    ckpt = {"path": str(checkpoint), "sha256": _sha256(checkpoint)} if checkpoint else None
    protocols = list(cfg.eval.protocols)
    if "zero-shot" in protocols and not method.joint_space:
        print(f"bench: {cfg.method.name} has no joint image-text space; zero-shot is not evaluated", file=sys.stderr)
        protocols.remove("zero-shot")
    for dataset in cfg.eval.datasets:
        get_adapter(dataset)
        data = None
        for protocol in protocols:
            fraction = float(cfg.eval.linear_probe.fraction) if protocol == "linear-probe" else 1.0
            key = RecordKey(name, ablation, phash, int(cfg.seed), dataset, protocol, fraction,
                            int(cfg.eval.seed), eval_hash(cfg, protocol, dataset))
            if store.exists(key) and not force:
                continue
            if data is None:
                data = load_dataset(cfg, dataset)
            data.splits.used.clear()
            data.skipped.clear()
            started = time.time()
            out = PROTOCOLS[protocol](method, data, cfg, device, cfg.runtime.num_workers)
            task = data.task
            record = {
                "metrics": out["metrics"], "per_class": out["per_class"], "n_test": out["n_test"],
                "chosen": out.get("chosen", {}),
                "task": {"labels": task.labels, "kind": task.kind, "metric": task.metric},
                "config": to_plain(cfg), "config_hash": config_hash(cfg), "checkpoint": ckpt,
                "splits": {"dir": str(data.splits.directory), "sha256": dict(data.splits.used),
                           "unreadable_skipped": dict(data.skipped)},
                "git": git_state(), "libraries": library_versions(),
                "device": device_info(device), "wall_time_s": round(time.time() - started, 3),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            written.append(store.write(key, record, out["predictions"]))
    return written


def run_experiment(cfg: DictConfig, force: bool = False) -> ResultsStore:
    """Pretrain (or resume, or reuse) and evaluate; also evaluate the same architecture untrained."""
    quiet_libraries()
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    device = resolve_device(cfg.runtime.device)
    store = ResultsStore(cfg.results_dir)
    method, final = pretrain(cfg, store, device)
    evaluate(cfg, method, (cfg.method.name, cfg.ablation, pretrain_hash(cfg)), final, store, device, force)
    if cfg.eval.random_init_baseline:
        # the pretrained model's exact starting point: same architecture, same seed, no training
        untrained = build_method(cfg, cfg.seed).to(device)
        arch = stable_hash({"method": to_plain(cfg.method), "model": to_plain(cfg.model)})
        evaluate(cfg, untrained, (RANDOM_INIT, cfg.method.name, arch), None, store, device, force)
    return store
