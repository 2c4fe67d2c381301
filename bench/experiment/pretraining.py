"""Pretraining one run: its corpus (the method's sources, mixed in every batch), its model, and the trainer;
a finished run is reused, a killed one resumed, and two processes given the same run train it once."""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.io import atomic_write_text, remove_stale_temporaries
from bench.core.registry import METHODS
from bench.core.results import ResultsStore
from bench.data.corpus import MixedBatchSampler, Pool, PretrainCorpus, batch_composition, corpus_summary
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache
from bench.data.loading import load_dataset
from bench.experiment.identity import corpus_sources, pretrain_hash
from bench.modeling.label_prompts import check_templates, label_prompt
from bench.modeling.method import Method
from bench.train import distributed
from bench.train.speed import Speed, loader_workers
from bench.train.trainer import Trainer, Validation, seed_everything


def build_method(cfg: DictConfig, seed: int) -> Method:
    seed_everything(seed)
    return METHODS.get(cfg.method.name)(cfg)


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
    pools: dict[str, Pool] = {}
    for kind, names in corpus_sources(cfg).items():
        parts = []
        for name in names:
            if kind == "image_only":  # the labels as written, for prompts
                data = load_dataset(cfg, name, labels_as_written=True)
                rows = data.rows("train")
                if rows.empty:
                    raise UserError(f"{name}: no readable training images for the image-only corpus")
                parts.append((name, rows, data.labels_as_written(rows)))
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
    cache = ImageCache(cfg.data.cache_dir, int(image.image_size))
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
