"""Retrieval in the joint space, over the whole test split (never per batch):

- **image-report** (a dataset whose adapter provides reports, MIMIC-CXR): every test image queries every
  distinct report text of the split, and every report queries every image (CXR-CLIP, BenchX). Identical texts
  are one item (several images of a study share their report, and normal reports often read the same), so a
  hit is the image's own report text, or for a report any image it describes. Metrics `i2t_r@K` and
  `t2i_r@K`: the share of queries with a hit among the first K (Recall@K).
- **class-consistent** (a dataset whose test images carry exactly one class, CheXpert 5x200): every test image
  queries the other test images, and `i2i_p@K` is the share of the first K that have its class (Precision@K).
  GLoRIA's and MGCA's version retrieves CheXpert reports, which are not public; so the items here are images,
  compared in the joint space.

K is each of `ks`; ties count against the query (an irrelevant item scoring the same as a hit ranks first), and a
split must hold more than max(ks) items. CIs: a percentile bootstrap over queries (each direction resamples its own queries, with
the harness's resample indices, so two models on the same split are paired). The stored predictions hold each
query's rank of its first hit (`first_hit`) or its hits among the first max(ks) (`hits@K`), from which every
number recomputes.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.core.checks import integer, list_of
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_protocol
from bench.evaluation.protocol import EvalContext, Protocol, dataset_list

np = lazy_module("numpy")
pd = lazy_module("pandas")

if TYPE_CHECKING:
    from bench.evaluation.result import SampleMeanResult


@register_protocol("retrieval")
class Retrieval(Protocol):
    order = 4
    frozen = True
    needs_joint_space = True
    requires = frozenset({"reports", "single-label"})
    defaults = {
        "datasets": ["mimic-cxr", "chexpert-5x200"],  # where it runs (null: eval.datasets), whatever eval.datasets says
        "ks": [1, 5, 10],
    }
    setting_checks = {"datasets": dataset_list, "ks": list_of(integer(1), nonempty=True, distinct=True)}

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> SampleMeanResult:
        return retrieval(ctx)

    @classmethod
    def is_metric(cls, name: str) -> bool:
        return re.fullmatch(r"(i2t|t2i)_r@[1-9][0-9]*|i2i_p@[1-9][0-9]*", name) is not None

    @classmethod
    def headline_metrics(cls, present: Sequence[str]) -> list[str]:
        """Each direction's metric at its smallest K (`ks` is configurable, so K=1 may be absent)."""
        smallest: dict[str, tuple[int, str]] = {}
        for name in filter(cls.is_metric, present):
            direction, k = name.split("@")
            smallest[direction] = min(smallest.get(direction, (int(k), name)), (int(k), name))
        return [name for _, (_, name) in sorted(smallest.items())]


def per_query_values(queries: dict[str, pd.DataFrame], ks: list[int]) -> dict[str, np.ndarray]:
    """metric -> each query's value, from the stored per-query outcomes: whether its first hit is within the first
    k (recall; `first_hit`), or the share of the first k that are hits (precision; `hits@k`)."""
    out = {}
    for direction, frame in queries.items():
        for k in ks:
            if "first_hit" in frame:
                out[f"{direction}_r@{k}"] = (frame["first_hit"].to_numpy() <= k).astype(float)
            else:
                out[f"{direction}_p@{k}"] = frame[f"hits@{k}"].to_numpy() / k
    return out


def _result(queries: dict[str, pd.DataFrame], ks: list[int], extra: dict) -> SampleMeanResult:
    from bench.evaluation.result import SampleMeanResult

    frame = pd.concat([q.assign(direction=d) for d, q in queries.items()], ignore_index=True)
    return SampleMeanResult(per_query_values(queries, ks), list(frame["query"]), frame,
                            {d: len(q) for d, q in queries.items()}, {"ks": ks}, extra)


def first_hit_ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """[queries] the 1-based rank of each query's best-ranked relevant item; similarity and relevant are
    [queries, items]. Ties count against the query: an irrelevant item scoring the same as the hit ranks first."""
    best = np.where(relevant, similarity, -np.inf).max(1)
    return 1 + ((similarity >= best[:, None]) & ~relevant).sum(1)


def hits_at(similarity: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """{k: [queries] relevant items among each query's first k}; ties count against the query (irrelevant items
    first), as in `first_hit_ranks`."""
    order = np.lexsort((relevant, -similarity), axis=1)[:, :max(ks)]
    found = np.take_along_axis(relevant, order, axis=1)
    return {k: found[:, :k].sum(1) for k in ks}


def _embeddings(ctx: EvalContext, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    from bench.evaluation.protocols.zero_shot import _joint_embeddings

    rows, features = ctx.features.get(ctx.method, ctx.data, split)
    if rows.empty:
        raise UserError(f"retrieval: the {split} split of {ctx.data.name} is empty")
    embeddings = _joint_embeddings(ctx.method, features, ctx.device)
    _finite(embeddings, f"the {split} images of {ctx.data.name}")
    return rows, embeddings


def _finite(embeddings: np.ndarray, what: str) -> None:
    # a NaN similarity would rank every item below the hit: perfect recall for a broken model
    if not np.isfinite(embeddings).all():
        raise UserError(f"retrieval: the model's joint-space embeddings of {what} are not finite (NaN or inf)")


def _enough(ks: list[int], items: int, what: str) -> None:
    if items <= max(ks):
        raise UserError(f"retrieval: {what} has {items} items to retrieve, not more than K={max(ks)} "
                        f"(eval.retrieval.ks)")


def _text_id(text: str) -> str:
    import hashlib

    return "report:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def retrieval(ctx: EvalContext) -> SampleMeanResult:
    from bench.core.registry import DATASETS
    from bench.evaluation.protocols.zero_shot import _embed_texts

    ks = [int(k) for k in ctx.cfg.eval.retrieval.ks]
    split, name = ctx.report_split, ctx.data.name
    if "reports" in DATASETS.get(name).provides:
        if "report" not in ctx.data.manifest.columns:
            raise UserError(f"retrieval: {name} was loaded without its reports (load_dataset(with_reports=True))")
        rows, images = _embeddings(ctx, split)
        reports, owner = np.unique(rows["report"].astype(str).to_numpy(), return_inverse=True)
        _enough(ks, min(len(reports), len(rows)), f"{name}'s {split} split ({len(rows)} images, "
                                                   f"{len(reports)} distinct reports)")
        text_emb = _embed_texts(ctx.method, list(reports), ctx.device)
        _finite(text_emb, f"the {split} reports of {name}")
        similarity = images @ text_emb.T
        relevant = owner[:, None] == np.arange(len(reports))[None, :]
        image_queries = pd.DataFrame({"query": rows["sample_id"].astype(str),
                                      "first_hit": first_hit_ranks(similarity, relevant)})
        report_queries = pd.DataFrame({"query": [_text_id(t) for t in reports],
                                       "first_hit": first_hit_ranks(similarity.T, relevant.T)})
        return _result({"i2t": image_queries, "t2i": report_queries}, ks,
                       {"retrieval": "image-report", "items": {"images": len(rows), "reports": len(reports)}})
    rows, images = _embeddings(ctx, split)
    y = rows[ctx.data.task.labels].to_numpy(dtype=float)
    if not (y.sum(1) == 1).all():
        raise UserError(f"retrieval: {name}'s {split} images do not each carry exactly one class")
    _enough(ks, len(rows) - 1, f"{name}'s {split} split")
    classes = y.argmax(1)
    similarity = images @ images.T
    np.fill_diagonal(similarity, -np.inf)  # a query never retrieves itself
    relevant = classes[:, None] == classes[None, :]
    np.fill_diagonal(relevant, False)
    hits = hits_at(similarity, relevant, ks)
    queries = pd.DataFrame({"query": rows["sample_id"].astype(str), **{f"hits@{k}": hits[k] for k in ks}})
    return _result({"i2i": queries}, ks, {"retrieval": "class-consistent", "items": {"images": len(rows)}})
