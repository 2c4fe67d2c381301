"""Which image patches and which report word-pieces a masked-modelling method hides.

Image (AttMIM and random): `attention_scores` scores each patch by how strongly a text attends to it;
`select_patches` takes, per sample, the top-scoring patches for `attention_share` of the mask and uniformly
random other patches for the rest; every sample keeps at least `min_visible` patches; `hit_rate` measures how
often such masks hide findings (ground truth: `bench.data.finding_masks`).
Text (EntMLM and random): `TextMasker` hides every word-piece of chosen entity spans, or random whole words,
and returns MLM labels for the hidden pieces.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from bench.core.errors import UserError
from bench.data.batch import TextBatch
from bench.modeling.entities import tag_entities, word_spans
from bench.modeling.towers import Tokenizer

IGNORE = -100  # the label of a position that is not predicted (PyTorch's cross-entropy default)
SOFTMAX_AXES = ("patches", "words")  # what AttMIM's attention softmax normalises over (`attention_scores`)


def attention_scores(words: torch.Tensor, patches: torch.Tensor, attention_mask: torch.Tensor, over: str
                     ) -> torch.Tensor:
    """[B, N] how strongly each image's patches respond to its text, from the scaled dot products of the text's
    tokens `words` [B, L, d] and patch tokens `patches` [B, N, d]. Only word-pieces count: [CLS], [SEP] and the
    padding of `attention_mask` [B, L] take no part (unless nothing else is left).

    over="patches": each word's attention is a softmax over the patches, and a patch scores the attention it
    receives, averaged over the words; every word spends one unit, so a weakly matched word still ranks its
    best patch high. over="words": each patch attends over the words, A = softmax(E_img E_txt^T / sqrt(d)) E_txt
    (the form a summary of the paper writes), and scores the match of its attended text feature with itself,
    sum_l a_nl * logit_nl: a smooth maximum of its logits, so a patch ranks by its own best match. (The
    words-softmax weights alone sum to one for every patch and could not rank them.)"""
    if over not in SOFTMAX_AXES:
        raise UserError(f"image_masking.attention_softmax must be one of {', '.join(SOFTMAX_AXES)}, got {over!r}")
    valid = attention_mask.bool().clone()
    valid[:, 0] = False  # [CLS]
    valid[torch.arange(len(valid)), attention_mask.sum(1) - 1] = False  # [SEP]
    valid = torch.where(valid.any(1, keepdim=True), valid, attention_mask.bool()).unsqueeze(-1)
    logits = torch.einsum("bld,bnd->bln", words, patches).div(math.sqrt(words.shape[-1]))
    if over == "patches":
        return (logits.softmax(-1) * valid).sum(1) / valid.sum(1)
    logits = logits.masked_fill(~valid, 0.0)
    attention = logits.masked_fill(~valid, torch.finfo(logits.dtype).min).softmax(1)
    return (attention * logits).sum(1)


@dataclass(frozen=True)
class PatchMask:
    keep: torch.Tensor    # [B, n_keep] indices of the visible patches, ascending
    masked: torch.Tensor  # [B, N] True where a patch is hidden


def mask_counts(num_patches: int, ratio: float, share: float, min_visible: int) -> tuple[int, int]:
    """(patches hidden, of which chosen by score) for one sample."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"mask_ratio must be in [0, 1), got {ratio}")
    if not 0.0 <= share <= 1.0:
        raise UserError(f"attention_share must be in [0, 1], got {share}")
    if not 1 <= min_visible <= num_patches:
        raise UserError(f"min_visible must be between 1 and the {num_patches} patches, got {min_visible}")
    hidden = min(int(round(ratio * num_patches)), num_patches - min_visible)
    return hidden, int(round(share * hidden))


def select_patches(scores: torch.Tensor | None, batch: int, num_patches: int, ratio: float, share: float,
                   min_visible: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> PatchMask:
    """Hide the `share` of the mask with the highest `scores` ([B, N]; None = no scores, all random) and fill
    the rest of the mask uniformly at random from the other patches. Random draws use torch's global RNG,
    which the trainer checkpoints, so a resumed run draws the same masks; a probe passes its own `generator`
    (on `device`), so measuring the masks never moves training's stream."""
    hidden, by_score = mask_counts(num_patches, ratio, share if scores is not None else 0.0, min_visible)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    if by_score:
        top = scores.float().topk(by_score, dim=1).indices
        noise.scatter_(1, top, -1.0)  # below every uniform draw: sorted first, so always hidden
    order = noise.argsort(dim=1)
    masked = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, order[:, :hidden], True)
    keep = order[:, hidden:].sort(dim=1).values
    return PatchMask(keep, masked)


@dataclass(frozen=True)
class HitRate:
    """How often a patch mask hides findings, over a set of images (see `hit_rate`)."""

    hit_rate: float | None       # share of the hidden patches that are on a finding
    finding_share: float | None  # the hit rate a uniformly random mask of the same sizes has, in expectation
    lift: float | None           # hit_rate / finding_share: 1 = no better than random masking
    images: int
    hidden: int                  # hidden patches, all images together
    hits: int                    # of which on a finding

    def metrics(self, prefix: str = "") -> dict[str, float | None]:
        return {f"{prefix}hit_rate": self.hit_rate, f"{prefix}finding_share": self.finding_share,
                f"{prefix}lift": self.lift}


def hit_rate(masked: torch.Tensor, on_finding: torch.Tensor) -> HitRate:
    """AttMIM's hit rate and its lift over random masking, pooled per hidden patch over the images.

    With m_b the hidden patches of image b, f_b its patches on a finding and N patches per image:
    hit rate = sum_b |m_b & f_b| / sum_b |m_b|; finding share = sum_b |m_b| (|f_b| / N) / sum_b |m_b|, the
    expected hit rate of masks drawn uniformly at random with the same number hidden per image (every
    `select_patches` mask hides the same number, so this is the mean share of patches on a finding,
    sum_b |f_b| / (B N)); lift = hit rate / finding share. None where a ratio has a zero denominator (no
    hidden patch; no finding in any image)."""
    masked, on_finding = torch.as_tensor(masked, dtype=torch.bool), torch.as_tensor(on_finding, dtype=torch.bool)
    if masked.shape != on_finding.shape or masked.ndim != 2:
        raise ValueError(f"masked {tuple(masked.shape)} and on_finding {tuple(on_finding.shape)} must both be [B, N]")
    per_image = masked.sum(1).double()
    hidden, hits = int(per_image.sum()), int((masked & on_finding).sum())
    expected = float((per_image * on_finding.double().mean(1)).sum())
    rate = hits / hidden if hidden else None
    share = expected / hidden if hidden else None
    lift = rate / share if rate is not None and share else None
    return HitRate(rate, share, lift, int(masked.shape[0]), hidden, hits)


STRATEGIES = ("entity", "random-matched", "random")


class TextMasker:
    """Replaces chosen word-pieces by [MASK] and labels them for MLM.

    - `entity` (EntMLM): each tagged entity span is hidden with probability `entity_mask_prob`, all of its
      word-pieces; a report without any entity falls back to `random`. With `mask_negated` False, entities
      in a negation scope ("No [pneumothorax]", bench.modeling.entities) are not candidates: a report whose
      entities are all negated falls back to `random` too.
    - `random-matched`: random whole words, as many word-pieces as `entity` would hide in that report (the
      random-mask ablation: same amount, no entity guidance).
    - `random` (MRM): each whole word hidden with probability `random_ratio`.
    `random` and the fallback hide at least one word of every non-empty report; `entity` may hide none (every
    entity's draw failed: the report then has no MLM target). Draws come from a per-sample numpy generator.
    """

    def __init__(self, tokenizer: Tokenizer, strategy: str, entity_mask_prob: float, random_ratio: float,
                 mask_negated: bool = True):
        if strategy not in STRATEGIES:
            raise UserError(f"text_masking.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        for name, value in (("entity_mask_prob", entity_mask_prob), ("random_ratio", random_ratio)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"text_masking.{name} must be in [0, 1], got {value}")
        self.tokenizer, self.strategy = tokenizer, strategy
        self.entity_mask_prob, self.random_ratio, self.mask_negated = entity_mask_prob, random_ratio, mask_negated
        self.mask_id = tokenizer.hf.mask_token_id
        if self.mask_id is None:
            raise UserError(f"tokenizer {tokenizer.hf.name_or_path!r} has no [MASK] token; masked language "
                            f"modelling needs one")

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, settings: Mapping) -> TextMasker:
        """The masker a method's `text_masking` settings describe."""
        return cls(tokenizer, settings["strategy"], float(settings["entity_mask_prob"]),
                   float(settings["random_ratio"]), bool(settings.get("mask_negated", True)))

    def __call__(self, texts: list[str], rngs: list[np.random.Generator], maskable: list[bool]
                 ) -> tuple[TextBatch, TextBatch, torch.Tensor]:
        """(unmasked batch, masked batch, labels [n, L] with IGNORE where nothing is predicted). Rows with
        `maskable` False (prompts) are returned unmasked and unlabelled."""
        enc = self.tokenizer.hf(list(texts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.max_length, return_offsets_mapping=True,
                                return_special_tokens_mask=True)
        # lists to arrays here: transformers' own conversion walks the nested offsets in Python, slowly
        enc = {k: np.asarray(enc[k], dtype=np.int64) for k in
               ("input_ids", "attention_mask", "offset_mapping", "special_tokens_mask")}
        ids, attention = enc["input_ids"], enc["attention_mask"]
        labels = np.full(ids.shape, IGNORE, dtype=np.int64)
        for row, (text, rng) in enumerate(zip(texts, rngs)):
            if not maskable[row]:
                continue
            pieces = self.choose(text, enc["offset_mapping"][row], enc["special_tokens_mask"][row], rng)
            labels[row, pieces] = ids[row, pieces]
        masked_ids = np.where(labels != IGNORE, self.mask_id, ids)
        unmasked = TextBatch(torch.from_numpy(ids).long(), torch.from_numpy(attention).long())
        return unmasked, TextBatch(torch.from_numpy(masked_ids).long(), unmasked.attention_mask), \
            torch.from_numpy(labels)

    def choose(self, text: str, offsets: np.ndarray, special: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of the word-pieces to hide in one tokenised report."""
        real = np.flatnonzero((special == 0) & (offsets[:, 1] > offsets[:, 0]))
        if real.size == 0:
            return real
        if self.strategy == "random":
            return _random_words(_pieces_by_word(text, offsets, real), rng, ratio=self.random_ratio)
        entities = [e for e in tag_entities(text) if self.mask_negated or not e.negated]
        spans = np.array([(e.start, e.end) for e in entities], dtype=np.int64).reshape(-1, 2)
        hidden = spans[[rng.random() < self.entity_mask_prob for _ in range(len(spans))]]
        # the pieces that overlap a hidden entity's characters
        overlap = (offsets[real, 0, None] < hidden[None, :, 1]) & (offsets[real, 1, None] > hidden[None, :, 0])
        pieces = real[overlap.any(1)].astype(np.int64)
        if not len(spans):  # no entity to hide: a random mask, so the report still trains the text branch
            return _random_words(_pieces_by_word(text, offsets, real), rng, ratio=self.random_ratio)
        if self.strategy == "random-matched":
            return _random_words(_pieces_by_word(text, offsets, real), rng, count=len(pieces))
        return pieces


def _pieces_by_word(text: str, offsets: np.ndarray, real: np.ndarray) -> list[list[int]]:
    """Word-piece indices grouped by the whitespace word they fall in (pieces past truncation are absent)."""
    starts = [start for start, _ in word_spans(text)]
    groups: list[list[int]] = [[] for _ in starts]
    for i, word in zip(real.tolist(), (np.searchsorted(starts, offsets[real, 0], side="right") - 1).tolist()):
        groups[word].append(i)
    return [g for g in groups if g]


def _random_words(words: list[list[int]], rng: np.random.Generator, ratio: float | None = None,
                  count: int | None = None) -> np.ndarray:
    """Whole random words adding up to `count` pieces, or each word with probability `ratio` (then never
    none, since a report with no target would not train the branch)."""
    if not words:
        return np.zeros(0, dtype=np.int64)
    order = rng.permutation(len(words))
    if count is None:
        chosen = [w for w in order if rng.random() < ratio] or [order[0]]
    else:  # words that fit first, then one more if still short: at most one word's pieces too many
        chosen, total = [], 0
        for w in order:
            if total + len(words[w]) <= count:
                chosen.append(w)
                total += len(words[w])
        if total < count:
            chosen.append(next(w for w in order if w not in chosen))
    return np.array(sorted(i for w in chosen for i in words[w]), dtype=np.int64)
