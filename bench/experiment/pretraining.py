"""Pretraining one run: its corpus (the method's sources, mixed in every batch), its model, and the trainer;
a finished run is reused, a killed one resumed, and two processes given the same run train it once."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.io import atomic_write_text, remove_stale_temporaries
from bench.core.registry import DATASETS, METHODS
from bench.core.results import ResultsStore
from bench.data.corpus import MixedBatchSampler, Pool, PretrainCorpus, batch_composition, corpus_summary
from bench.data.finding_masks import ground_truth_grid
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache
from bench.data.loading import dataset_root, dataset_settings, load_dataset
from bench.experiment.identity import corpus_sources, pretrain_hash
from bench.modeling.label_prompts import check_templates, label_prompt
from bench.modeling.masking import HitRate, hit_rate
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


def corpus_paired_prompts(cfg: DictConfig) -> bool:
    """Whether paired samples also get the prompt of their own labels (MMCLIP's `prompts.paired`)."""
    return corpus_prompt(cfg) is not None and bool(cfg.method.prompts.get("paired", False))


def head_labels(name: str, written: pd.DataFrame, heads: list[str]) -> np.ndarray:
    """[samples, heads] label values of one source for a method trained on labels (`method.labels`): 1, 0 and
    -1 (uncertain) as written, blank (not mentioned) as 0, as every adapter's own labels count it (MIMIC-CXR's
    already do); NaN for a head the source does not label (CheXpert's adapter keeps its 5 competition labels)."""
    known = [h for h in heads if h in written.columns]
    if not known:
        raise UserError(f"{name} labels none of method.labels ({', '.join(heads)}); its labels: "
                        f"{', '.join(written.columns)}")
    out = written.reindex(columns=heads).astype(float)
    out[known] = out[known].fillna(0.0)
    return out.to_numpy(dtype=np.float32)


def build_corpus(cfg: DictConfig, seed: int) -> tuple[PretrainCorpus, MixedBatchSampler, dict]:
    """The pretraining corpus of the method's sources (data.corpus), its batch sampler, and a summary. A method
    with `labels` (its label heads) gets every image's values of them and no text-only source: those rows
    would hold nothing it learns from."""
    image = cfg.model.image
    heads = list(cfg.method.get("labels") or [])
    prompt = corpus_prompt(cfg)
    paired_prompts = corpus_paired_prompts(cfg)
    size = METHODS.get(cfg.method.name).corpus_image_size(cfg)  # the readability check decodes at this size
    pools: dict[str, Pool] = {}
    for kind, names in corpus_sources(cfg).items():
        parts = []
        for name in names:
            if kind == "image_only":  # the labels as written, for prompts
                data = load_dataset(cfg, name, labels_as_written=True, cache_size=size)
                rows = data.rows("train")
                if rows.empty:
                    raise UserError(f"{name}: no readable training images for the image-only corpus")
                parts.append((name, rows, data.labels_as_written(rows)))
                continue
            # the reports are read even by a method without text: they decide which studies are paired samples,
            # so it trains on the images the image-text methods train on
            # label heads and paired prompts read a paired source's labels as written
            written = kind == "paired" and (bool(heads) or paired_prompts)
            data = load_dataset(cfg, name, with_reports=True, labels_as_written=written, cache_size=size)
            if "report" not in data.manifest.columns:
                raise UserError(f"{name} has no reports, so it cannot be a {kind} source of data.corpus")
            # a text-only source's images are never read, so they are not decoded either
            rows = data.rows("train") if kind == "paired" else data.splits.rows("train")
            parts.append((name, rows, data.labels_as_written(rows) if written else None))
        if not parts:
            continue
        ids = [f"{name}:{i}" for name, rows, _ in parts for i in rows["sample_id"]]
        pools[kind] = Pool(
            kind, [name for name, _, _ in parts], ids,
            paths=None if kind == "text_only" else [p for _, rows, _ in parts for p in rows["image_path"]],
            texts=None if kind == "image_only" else [t for _, rows, _ in parts for t in rows["report"]],
            labels=pd.concat([lab for _, _, lab in parts], ignore_index=True)
            if kind == "image_only" or (kind == "paired" and paired_prompts) else None,
            head_labels=np.concatenate([head_labels(name, lab, heads) for name, _, lab in parts]) if heads else None)
    preprocess = ImagePreprocessor(size, image.mean, image.std, True, corpus_channels(image))
    cache = ImageCache(cfg.data.cache_dir, size)
    corpus = PretrainCorpus(pools, preprocess, cache, seed, prompt, pairing=str(cfg.method.get("pairing", "matched")),
                            paired_prompts=paired_prompts)
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
    probe = hit_rate_probe(cfg, corpus, method) if distributed.is_main() else None  # rank 0 alone logs
    trainer = Trainer(cfg.trainer, run_dir, device, cfg.runtime.progress,
                      loader_workers(cfg.runtime.num_workers, device), Speed.resolve(cfg.runtime.speed, device),
                      loggers=cfg.runtime.loggers)
    trainer.fit(method, corpus, method.make_collate(), sampler, cfg.seed, validation, probe)


# the probe's images and random draws are the same for every run and seed, so runs are compared on one probe
PROBE_SEED = 0
# paired training rows looked at for ground truth at most: a corpus without any (real MIMIC) costs this many stats
PROBE_SCAN = 4096


@dataclass
class HitRateProbe:
    """AttMIM's hit rate on fixed images with ground-truth finding masks (`bench.data.finding_masks`): the
    masks `method.mask_probe` chooses for `images` paired with `texts`, with random draws from a generator
    seeded `seed` afresh each time, scored against `on_finding` (`bench.modeling.masking.hit_rate`). As the
    trainer's monitor it logs `attmim_hit_rate`, `attmim_finding_share` and `attmim_lift` every `every` steps.
    The caller sets eval mode and no_grad (the trainer's `measure` does)."""

    images: torch.Tensor      # [P, C, H, W], preprocessed as training's inputs, without augmentation
    texts: list[str]
    on_finding: torch.Tensor  # [P, N] bool
    every: int = 0
    seed: int = PROBE_SEED
    chunk: int = 32

    def __call__(self, method: Method) -> dict[str, float | None]:
        return self.measure(method).metrics("attmim_")

    def measure(self, method: Method) -> HitRate:
        device = next(method.parameters()).device
        generator = torch.Generator(device).manual_seed(self.seed)
        masked = [method.mask_probe(self.images[i:i + self.chunk].to(device), self.texts[i:i + self.chunk],
                                    generator).cpu() for i in range(0, len(self.texts), self.chunk)]
        return hit_rate(torch.cat(masked), self.on_finding)


def hit_rate_probe(cfg: DictConfig, corpus: PretrainCorpus, method: Method) -> HitRateProbe | None:
    """The probe `method.image_masking.hit_rate_every` asks for: the first `hit_rate_images` paired training
    images with ground truth in a shuffle seeded PROBE_SEED (among its first PROBE_SCAN rows), with their
    reports. None when it is off, the method masks no images, or no probed image has ground truth. Draws
    nothing from the global random streams."""
    im = cfg.method.get("image_masking")
    every = int(im.get("hit_rate_every") or 0) if im is not None and im.get("enabled", False) else 0
    pool = corpus.pools.get("paired")
    if not every or pool is None or not callable(getattr(method, "mask_probe", None)):
        return None
    adapters: dict = {}

    def mask_of(i: int):
        name, sample_id = pool.ids[i].split(":", 1)  # the corpus's ids are "<source>:<sample id>"
        if name not in adapters:
            adapters[name] = DATASETS.get(name)(dataset_root(cfg, name), dataset_settings(cfg, name))
        return adapters[name].finding_mask({"sample_id": sample_id, "image_path": pool.paths[i]})

    tower = method.image_tower
    order = np.random.default_rng(PROBE_SEED).permutation(len(pool))[:PROBE_SCAN]
    kept, grid = ground_truth_grid(order.tolist(), mask_of, tower.image_size, tower.patch_size,
                                   int(im.get("hit_rate_images", 64)))
    if not kept:
        return None
    images = torch.stack([corpus.preprocess(corpus.cache.get(pool.paths[i]), None) for i in kept])
    return HitRateProbe(images, [pool.texts[i] for i in kept], torch.from_numpy(grid), every)
