"""The batches a profile times: built in memory on the device, or read through the trainer's loader."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from bench.data.batch import Batch
from bench.data.corpus import KINDS, CorpusItem, Pool, batch_composition
from bench.experiment.identity import corpus_sources
from bench.modeling.method import Method
from bench.train.trainer import Trainer


def synthetic_batches(cfg: DictConfig, method: Method, count: int, seed: int) -> tuple[list[Batch], object]:
    """`count` collated batches of `trainer.batch_size` rows mixed as the corpus would be (paired, image-only
    with its prompt, text-only), with random images and generated reports; and a stand-in corpus for
    `Method.prepare` (its reports)."""
    from bench.data.synth.findings import sample_patient
    from bench.data.synth.reports import write_report
    from bench.experiment.pretraining import corpus_channels, corpus_paired_prompts, corpus_prompt

    image = cfg.model.image
    channels, size = corpus_channels(image), type(method).corpus_image_size(cfg)
    kinds = [k for k in KINDS if corpus_sources(cfg).get(k)]
    per_batch = batch_composition(int(cfg.trainer.batch_size), dict(cfg.data.corpus.mix), {k: 1 for k in kinds})
    prompt = corpus_prompt(cfg)
    paired_prompts = corpus_paired_prompts(cfg)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    collate = method.make_collate()
    batches, reports = [], []
    for b in range(count):
        items = []
        for kind in kinds:
            for j in range(per_batch[kind]):
                patient = sample_patient(rng)
                report = " ".join(part for part in write_report(patient, rng) if part)
                reports.append(report)
                pixels = None if kind == "text_only" else torch.randn(channels, size, size, generator=generator)
                text = report if kind != "image_only" else prompt(patient.labels()) if prompt else None
                paired_prompt = prompt(patient.labels()) if kind == "paired" and paired_prompts else None
                items.append(CorpusItem(pixels, text, f"synthetic:{b}:{kind}:{j}", kind, int(rng.integers(2 ** 31)),
                                        prompt=paired_prompt))
        batches.append(collate(items))
    pools = {"paired": Pool("paired", ["synthetic-tensors"], [str(i) for i in range(len(reports))],
                            texts=reports)}
    return batches, _Corpus(pools)


@dataclass
class _Corpus:
    pools: dict[str, Pool]


def loader_batches(trainer: Trainer, corpus, sampler, collate, seed: int) -> Iterator[Batch]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        corpus.set_epoch(epoch)
        yield from trainer.loader(corpus, sampler, collate, seed)
        epoch += 1


def loader_rate(trainer: Trainer, corpus, sampler, collate, seed: int, batches: int) -> float:
    """Images per second the loader alone delivers (workers started, first batch excluded)."""
    stream = loader_batches(trainer, corpus, sampler, collate, seed)
    next(stream)
    images, started = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        images += 0 if batch.images is None else batch.images.shape[0]
    seconds = time.perf_counter() - started
    stream.close()
    return images / seconds


# --- one configuration, ready to step --------------------------------------------------------------------------


def images_per_batch(cfg: DictConfig) -> int:
    kinds = [k for k in KINDS if corpus_sources(cfg).get(k)]
    per_batch = batch_composition(int(cfg.trainer.batch_size), dict(cfg.data.corpus.mix), {k: 1 for k in kinds})
    return sum(n for k, n in per_batch.items() if k != "text_only")


def cycle_batches(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches
