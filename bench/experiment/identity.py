"""The hashes that identify experiments in the results store: a run's configuration, its pretraining (what
decides the checkpoint) and one evaluation (what decides one record). Changing what goes into any of them
changes every record key, so they are written once, here."""
from __future__ import annotations

from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.hashing import stable_hash, to_plain
from bench.core.registry import PROTOCOLS
from bench.data.loading import dataset_identity

# keys that say how a run executes or where it writes, not what it computes
NON_SEMANTIC = ("runtime", "results_dir")


def config_hash(cfg: DictConfig) -> str:
    """Everything that decides the numbers, seeds included."""
    plain = to_plain(cfg)
    return stable_hash({k: v for k, v in plain.items() if k not in NON_SEMANTIC})


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


def pretrain_hash(cfg: DictConfig) -> str:
    """What decides a pretrained checkpoint except its seed: runs that differ only in seed share it, and
    tables aggregate seeds within it. Of `data`, only the corpus sources the method reads count."""
    plain = to_plain(cfg)
    kept = {k: v for k, v in plain.items() if k not in (*NON_SEMANTIC, "seed", "eval", "data")}
    sources = corpus_sources(cfg)
    data = {kind: [dataset_identity(cfg, name) for name in names] for kind, names in sources.items()}
    if len(sources) > 1:
        data["mix"] = to_plain(cfg.data.corpus.mix)
    return stable_hash({**kept, "data": data})


# eval settings that choose which records to make, or how fast, not what any one record holds
EVAL_SCHEDULE = ("datasets", "protocols", "fractions", "seeds", "random_init_baseline", "cache_features",
                 "batch_size")


def eval_hash(cfg: DictConfig, protocol: str, dataset: str) -> str:
    """The settings of one evaluation (its protocol's section of `eval`, the shared ones, the dataset's)."""
    e = to_plain(cfg.eval)
    sections = {cls.section() for cls in PROTOCOLS.classes()}
    shared = {k: v for k, v in e.items() if k not in EVAL_SCHEDULE and k not in sections}
    own = {k: v for k, v in e.get(PROTOCOLS.get(protocol).section(), {}).items() if k != "fractions"}  # which records
    return stable_hash({"protocol": protocol, "shared": shared, "own": own, "data": dataset_identity(cfg, dataset)})
