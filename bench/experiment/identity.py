"""The hashes that identify experiments in the results store: a run's configuration, its pretraining (what
decides the checkpoint) and one evaluation (what decides one record). Changing what goes into any of them
changes every record key, so they are written once, here."""
from __future__ import annotations

from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.hashing import stable_hash, to_plain
from bench.core.registry import PROTOCOLS
from bench.data.loading import dataset_identity
from bench.data.splits import FRACTION_RULE

# keys that say how a run executes or where it writes, not what it computes
NON_SEMANTIC = ("runtime", "results_dir")
# method settings that only choose what is measured alongside training (AttMIM's hit rate), not what is trained
MEASUREMENT_ONLY = ("image_masking.hit_rate_every", "image_masking.hit_rate_images")


def _semantic(cfg: DictConfig) -> dict:
    """The config without NON_SEMANTIC sections and without the method's MEASUREMENT_ONLY settings."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in NON_SEMANTIC}
    for key in MEASUREMENT_ONLY:
        *parents, leaf = key.split(".")
        node = plain.get("method", {})
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def config_hash(cfg: DictConfig) -> str:
    """Everything that decides the numbers, seeds included."""
    return stable_hash(_semantic(cfg))


def corpus_sources(cfg: DictConfig) -> dict[str, list[str]]:
    """The pretraining sources this method reads, by kind: always the paired ones; the image-only and
    text-only ones only for a method with `unpaired: true`, and no text-only ones for a method trained on
    labels (`method.labels`: a row without an image holds nothing it learns from)."""
    corpus = cfg.data.corpus
    sources = {"paired": list(corpus.paired)}
    if not sources["paired"]:
        raise UserError("data.corpus.paired is empty: pretraining needs at least one paired image-report source")
    if cfg.method.get("unpaired", False):
        sources["image_only"] = list(corpus.image_only)
        if not cfg.method.get("labels"):
            sources["text_only"] = list(corpus.text_only)
    return sources


def training_budget(cfg: DictConfig) -> dict:
    """What fixes a run's optimiser steps and its paired rows per step: the budget, the batch of paired rows,
    accumulation, and the paired corpus an epoch passes over. Runs with equal budgets train alike long,
    whatever unpaired data they read on top (bench.data.corpus.batch_composition)."""
    t = cfg.trainer
    return {"budget": to_plain(t.budget), "batch_size": int(t.batch_size), "accumulate": int(t.accumulate),
            "paired": [dataset_identity(cfg, name) for name in corpus_sources(cfg)["paired"]]}


def pretrain_hash(cfg: DictConfig) -> str:
    """What decides a pretrained checkpoint except its seed: runs that differ only in seed share it, and
    tables aggregate seeds within it. Of `data`, only the corpus sources the method reads count."""
    kept = {k: v for k, v in _semantic(cfg).items() if k not in ("seed", "eval", "data")}
    sources = corpus_sources(cfg)
    data = {kind: [dataset_identity(cfg, name) for name in names] for kind, names in sources.items()}
    if len(sources) > 1:  # the mix of the kinds this method reads
        data["mix"] = {kind: share for kind, share in to_plain(cfg.data.corpus.mix).items() if kind in sources}
    return stable_hash({**kept, "data": data})


# eval settings that choose which records to make, or how fast, not what any one record holds
EVAL_SCHEDULE = ("datasets", "protocols", "fractions", "seeds", "random_init_baseline", "cache_features",
                 "batch_size")


def eval_hash(cfg: DictConfig, protocol: str, dataset: str) -> str:
    """The settings of one evaluation (its protocol's section of `eval`, the shared ones, the dataset's)."""
    e = to_plain(cfg.eval)
    sections = {cls.section() for cls in PROTOCOLS.classes()}
    shared = {k: v for k, v in e.items() if k not in EVAL_SCHEDULE and k not in sections}
    # which records (fractions, datasets) is no setting of any one record
    own = {k: v for k, v in e.get(PROTOCOLS.get(protocol).section(), {}).items() if k not in ("fractions", "datasets")}
    # the rule that draws label fractions decides which training samples a record fits on
    return stable_hash({"protocol": protocol, "shared": shared, "own": own, "data": dataset_identity(cfg, dataset),
                        "fractions": FRACTION_RULE})
