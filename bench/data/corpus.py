"""The pretraining corpus: paired image-report samples, and optionally image-only samples (labelled images
with no report, which get a disease-kind prompt from their labels) and text-only samples (reports with no
image), mixed in every batch at a configured ratio.

A batch's rows are ordered paired, image-only, text-only. `Batch.images` holds the rows that have an
image, `Batch.text` the rows that have text, and `Batch.image_text` links each image to its text row. With
paired prompts (MMCLIP's `prompts.paired`) every paired image also gets the prompt of its own labels: extra text
rows after all the others, linked by `Batch.image_prompt`. A method that matches image regions with sentences
(MLIP) gets each report's sentences too (`Batch.sentences`, `Batch.sentence_index`).

Pairing `shuffled` (the negative control of image-text methods) gives each paired image the report of another
sample instead of its own: a derangement drawn afresh every epoch from (seed, epoch) alone, so a resumed run and
any number of loader workers see the same pairs, and no image meets a report equal to its own (one study's
several images share their report, so an index derangement alone would leave them matched).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from bench.core.errors import UserError
from bench.data.batch import Batch, TextBatch
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache
from bench.data.sentences import split_sentences

# texts -> their token batch (bench.modeling.towers.Tokenizer)
Tokenize = Callable[[list[str]], TextBatch]
# (texts, one generator per text, which may be masked) -> (text, masked text, MLM labels)
# (bench.modeling.masking.TextMasker)
MaskTexts = Callable[[list[str], list[np.random.Generator], list[bool]], tuple[TextBatch, TextBatch, torch.Tensor]]

KINDS = ("paired", "image_only", "text_only")
PAIRINGS = ("matched", "shuffled")  # how the paired pool's reports meet its images (method.pairing)
_PAIRING_STREAM = 1  # the spawn key of the pairing's random stream, apart from the per-item streams


@dataclass
class Pool:
    """The samples of one kind: image paths and/or texts, ids, for image-only samples their labels, and for a
    method trained on labels (methods/supervised.py) the values of its label heads."""

    kind: str
    sources: list[str]
    ids: list[str]
    paths: list[str] | None = None
    texts: list[str] | None = None
    labels: pd.DataFrame | None = None  # image-only (and paired, for paired prompts): values (1, 0, -1, NaN)
    # [samples, heads] float32: 1 positive, 0 negative or not mentioned, -1 uncertain, NaN: not labelled by the source
    head_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def main_kind(sizes: dict[str, int]) -> str:
    """The kind whose pass is an epoch and whose rows per batch are trainer.batch_size: paired where there are
    paired samples, else the largest pool."""
    return "paired" if sizes.get("paired") else max(sizes, key=sizes.get)


def batch_composition(batch_size: int, mix: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Samples of each kind per batch: `batch_size` of the main kind (paired), and on top of them, of each other
    kind that has samples, `mix[kind]` per main row, rounded to the nearest (at least 1 where its share is > 0).

    Unpaired rows come on top of the paired ones, never instead of them, so every method of one corpus takes
    the same optimiser steps per epoch with the same paired rows (in-batch negatives) per step, whatever
    unpaired data it reads."""
    bad = [k for k in mix if k not in KINDS or k == "paired"]
    if bad:
        raise UserError(f"data.corpus.mix has unknown kind(s) {', '.join(bad)}; it sets rows per paired row of: "
                        f"{', '.join(KINDS[1:])}")
    if any(float(w) < 0 for w in mix.values()):
        raise UserError(f"data.corpus.mix values must be >= 0, got {dict(mix)}")
    present = {k: n for k, n in sizes.items() if n}
    counts = {k: 0 for k in KINDS}
    if not present:
        return counts
    main = main_kind(present)
    counts[main] = batch_size
    for kind in present:
        if kind != main:
            # without paired samples the largest kind leads, and the others keep their ratio to it
            lead = 1.0 if main == "paired" else float(mix.get(main, 0.0)) or 1.0
            share = float(mix.get(kind, 0.0)) / lead
            counts[kind] = max(1, math.floor(batch_size * share + 0.5)) if share > 0 else 0
    return counts


def derangement(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation p with groups[p[j]] != groups[j] for every j (so p[j] != j).

    The groups are laid out one after another, in random order and each in random order, and every position
    takes the partner `m` places on (cyclically), m the largest group's size: no group spans m positions, so
    none meets itself, as long as m is at most half the samples. With singleton groups this is a uniformly
    random cycle through all samples."""
    n = len(groups)
    sizes = np.bincount(groups)
    shift = int(sizes.max()) if n else 0
    if n < 2 or 2 * shift > n:
        raise UserError(f"shuffled pairing: {n} paired samples, {shift} of them sharing one report; no pairing gives "
                        f"every image another report (at most half may share one)")
    order = np.lexsort((rng.random(n), rng.permutation(len(sizes))[groups]))
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[(np.arange(n) + shift) % n]
    return partner


class CorpusItem(NamedTuple):
    """One sample of the corpus as the collate functions receive it."""

    image: torch.Tensor | None
    text: str | None  # the report, or an image-only sample's prompt
    sample_id: str
    kind: str
    seed: int  # the per-item seed of its text mask
    heads: np.ndarray | None = None  # label-head values, for a method trained on labels
    prompt: str | None = None  # a paired sample's prompt from its labels, with paired prompts


class PretrainCorpus(Dataset):
    """Pools concatenated in KINDS order; item i of epoch e is a CorpusItem. Augmentation and text masks depend
    only on (seed, e, i), and the shuffled pairing on (seed, e), so a resumed run sees the same samples.
    `prompt` writes image-only samples' text from their labels, and with `paired_prompts` also a paired
    sample's second caption (its pool needs labels)."""

    def __init__(self, pools: dict[str, Pool], preprocess: ImagePreprocessor, cache: ImageCache, seed: int,
                 prompt: Callable[[dict], str] | None = None, pairing: str = "matched", paired_prompts: bool = False):
        if cache.size != preprocess.size:
            raise ValueError(f"image cache holds {cache.size}px squares, the model wants {preprocess.size}px")
        if pairing not in PAIRINGS:
            raise UserError(f"method.pairing={pairing!r}: expected one of {', '.join(PAIRINGS)}")
        if paired_prompts and (prompt is None or ("paired" in pools and pools["paired"].labels is None)):
            raise ValueError("paired prompts need a prompt writer and the paired pool's labels")
        self.paired_prompts = paired_prompts
        self.pools = {k: pools[k] for k in KINDS if k in pools and len(pools[k])}
        self.sizes = {k: len(p) for k, p in self.pools.items()}
        starts = np.cumsum([0, *self.sizes.values()])
        self.offsets = dict(zip(self.pools, starts[:-1].tolist()))
        self.preprocess, self.cache, self.seed, self.prompt, self.epoch = preprocess, cache, seed, prompt, 0
        self.pairing, self.partner = pairing, None
        if pairing == "shuffled":
            # equal reports are one group (a study's images share one): none may meet its own
            reports = self.pools["paired"].texts if "paired" in self.pools else []
            self.report_groups = pd.factorize(pd.Series(reports, dtype=object))[0]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.pairing == "shuffled":  # drawn here, in the main process, and handed to every worker
            stream = np.random.SeedSequence([self.seed, epoch], spawn_key=(_PAIRING_STREAM,))
            self.partner = derangement(self.report_groups, np.random.default_rng(stream))

    def __len__(self) -> int:
        return sum(self.sizes.values())

    def locate(self, i: int) -> tuple[str, int]:
        for kind in reversed(list(self.pools)):
            if i >= self.offsets[kind]:
                return kind, i - self.offsets[kind]
        raise IndexError(i)

    def __getitem__(self, i: int) -> CorpusItem:
        kind, j = self.locate(i)
        pool = self.pools[kind]
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        image = None
        if pool.paths is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i]) if self.preprocess.augment else None
            image = self.preprocess(self.cache.get(pool.paths[j]), rng)
        text = pool.texts[j] if pool.texts is not None else None
        if kind == "paired" and self.partner is not None:
            text = pool.texts[self.partner[j]]
        if kind == "image_only" and self.prompt is not None:
            text = self.prompt(pool.labels.iloc[j].to_dict())
        heads = pool.head_labels[j] if pool.head_labels is not None else None
        # the prompt of the image's own labels, also under shuffled pairing
        prompt = self.prompt(pool.labels.iloc[j].to_dict()) if kind == "paired" and self.paired_prompts else None
        return CorpusItem(image, text, pool.ids[j], kind, item_seed, heads, prompt)


def _text_id(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


@dataclass(frozen=True)
class Sentences:
    """How a collate splits reports into sentences: at most `max_sentences` each (`split_sentences`), tokenised
    by `tokenizer` (typically shorter than the reports'), padded to the batch's longest sentence."""

    tokenizer: Tokenize
    max_sentences: int
    deduplicate: bool = True

    def __call__(self, reports: list[str | None]) -> tuple[TextBatch, torch.Tensor]:
        """(every sentence's tokens, [reports, max_sentences] its sentence rows, -1 none); None: not a report."""
        index = torch.full((len(reports), self.max_sentences), -1, dtype=torch.long)
        sentences: list[str] = []
        for row, text in enumerate(reports):
            found = split_sentences(text, self.max_sentences, self.deduplicate) if text is not None else []
            index[row, :len(found)] = torch.arange(len(sentences), len(sentences) + len(found))
            sentences.extend(found)
        tokens = self.tokenizer(sentences)
        # sentences are short: padding only to the batch's longest saves most of the text tower's work on them
        length = max(int(tokens.attention_mask.sum(1).max()), 1) if sentences else 1
        return TextBatch(tokens.input_ids[:, :length], tokens.attention_mask[:, :length]), index


class CorpusCollate:
    """CorpusItems -> Batch: rows ordered by kind, text tokenised, paired samples' prompts (where the items
    carry them) as extra text rows after the others, with a masker the reports (not the prompts) masked for
    MLM, and with `sentences` the reports (not the prompts) split into sentences."""

    def __init__(self, tokenizer: Tokenize, masker: MaskTexts | None = None, sentences: Sentences | None = None):
        self.tokenizer, self.masker, self.sentences = tokenizer, masker, sentences

    def __call__(self, items: list[CorpusItem]) -> Batch:
        items = sorted(items, key=lambda it: KINDS.index(it.kind))
        with_image = [it for it in items if it.image is not None]
        # (text, its item, whether it is a prompt): reports and image-only prompts, then paired prompts
        rows = [(it.text, it, it.kind == "image_only") for it in items if it.text is not None]
        text_row = {id(it): r for r, (_, it, _) in enumerate(rows)}
        prompt_row = {}
        for it in with_image:
            if it.kind == "paired" and it.prompt is not None:
                prompt_row[id(it)] = len(rows)
                rows.append((it.prompt, it, True))
        images = torch.stack([it.image for it in with_image]) if with_image else None
        image_text = torch.tensor([text_row.get(id(it), -1) for it in with_image], dtype=torch.long)
        # a prompt is written from labels, so several images may share one: ITC treats equal prompts as the
        # same caption (a positive group named by the prompt's hash); every report is its own group (-1)
        groups = [_text_id(text) if is_prompt else -1 for text, _, is_prompt in rows]
        batch = Batch(images, None, [it.sample_id for it in items], image_text=image_text,
                      text_groups=torch.tensor(groups, dtype=torch.long))
        if prompt_row:
            batch.image_prompt = torch.tensor([prompt_row.get(id(it), -1) for it in with_image], dtype=torch.long)
        if not rows:
            return batch
        texts = [text for text, _, _ in rows]
        if self.sentences is not None:
            batch.sentences, batch.sentence_index = self.sentences(
                [None if is_prompt else text for text, _, is_prompt in rows])
        if self.masker is None:
            batch.text = self.tokenizer(texts)
            return batch
        rngs = [np.random.default_rng(it.seed) for _, it, _ in rows]
        maskable = [not is_prompt for _, _, is_prompt in rows]
        batch.text, batch.masked_text, batch.mlm_labels = self.masker(texts, rngs, maskable)
        batch.mlm_rows = torch.tensor(np.flatnonzero(maskable), dtype=torch.long)
        return batch


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of fixed composition whose order depends only on (seed, epoch); `skip` resumes mid-epoch.

    An epoch is one pass over the paired pool (each paired sample once, the last partial batch dropped);
    the other pools are drawn without replacement, reshuffled each time they run out.
    """

    def __init__(self, sizes: dict[str, int], per_batch: dict[str, int], seed: int,
                 setting: str = "trainer.batch_size"):
        main = main_kind(sizes)
        if sizes[main] < per_batch[main] or per_batch[main] == 0:
            raise UserError(f"{setting}={per_batch[main]}: the {sizes[main]} {main} training samples do not "
                            f"fill one batch's share of {per_batch[main]}; lower {setting} (or add {main} data)")
        self.sizes, self.per_batch, self.seed, self.main = sizes, per_batch, seed, main
        starts = np.cumsum([0, *sizes.values()])
        self.offsets = dict(zip(sizes, starts[:-1].tolist()))
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _stream(self, kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
        n = self.sizes[kind]
        rounds = -(-count // n) if count else 0
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(rounds)] or
                         [torch.zeros(0, dtype=torch.long)])[:count] + self.offsets[kind]

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        steps = self.sizes[self.main] // self.per_batch[self.main]
        streams = {k: self._stream(k, steps * self.per_batch[k], generator) for k in self.sizes}
        return [[int(i) for k in self.sizes
                 for i in streams[k][s * self.per_batch[k]:(s + 1) * self.per_batch[k]]] for s in range(steps)]

    def __iter__(self):
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        return self.sizes[self.main] // self.per_batch[self.main] - self.skip


def corpus_summary(pools: dict[str, Pool], per_batch: dict[str, int]) -> dict:
    """What the run trained on, for the run folder."""
    return {k: {"sources": p.sources, "samples": len(p), "per_batch": per_batch.get(k, 0)}
            for k, p in pools.items()}
