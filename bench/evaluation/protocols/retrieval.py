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

K is each of `ks`. CIs: a percentile bootstrap over queries (each direction resamples its own queries, with
the harness's resample indices, so two models on the same split are paired). The stored predictions hold each
query's rank of its first hit (`first_hit`) or its hits among the first max(ks) (`hits@K`), from which every
number recomputes.
"""
from __future__ import annotations

import re
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
    [queries, items]. Ties are ranked against the query: an item scoring the same as the hit counts as ahead."""
    best = np.where(relevant, similarity, -np.inf).max(1)
    return (similarity >= best[:, None]).sum(1)  # items scoring at least the hit's score, the hit included


def hits_at(similarity: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """{k: [queries] relevant items among each query's first k} (a stable order: ties keep the items' order)."""
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :max(ks)]
    found = np.take_along_axis(relevant, order, axis=1)
    return {k: found[:, :k].sum(1) for k in ks}


def _embeddings(ctx: EvalContext, data, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    from bench.evaluation.protocols.zero_shot import _joint_embeddings

    rows, features = ctx.features.get(ctx.method, data, split)
    if rows.empty:
        raise UserError(f"retrieval: the {split} split of {data.name} is empty")
    return rows, _joint_embeddings(ctx.method, features, ctx.device)


def retrieval(ctx: EvalContext) -> SampleMeanResult:
    from bench.core.registry import DATASETS
    from bench.data.loading import load_dataset
    from bench.evaluation.protocols.zero_shot import _embed_texts

    ks = [int(k) for k in ctx.cfg.eval.retrieval.ks]
    split, provides = ctx.report_split, DATASETS.get(ctx.data.name).provides
    if "reports" in provides:
        data = load_dataset(ctx.cfg, ctx.data.name, with_reports=True)
        rows, images = _embeddings(ctx, data, split)
        texts = rows["report"].fillna("").astype(str)
        reports, owner = np.unique(texts.to_numpy(), return_inverse=True)
        text_emb = _embed_texts(ctx.method, list(reports), ctx.device)
        similarity = images @ text_emb.T
        relevant = owner[:, None] == np.arange(len(reports))[None, :]
        image_queries = pd.DataFrame({"query": rows["sample_id"].astype(str),
                                      "first_hit": first_hit_ranks(similarity, relevant)})
        report_ids = [f"report:{i}" for i in range(len(reports))]
        report_queries = pd.DataFrame({"query": report_ids,
                                       "first_hit": first_hit_ranks(similarity.T, relevant.T)})
        return _result({"i2t": image_queries, "t2i": report_queries}, ks,
                       {"retrieval": "image-report", "items": {"images": len(rows), "reports": len(reports)}})
    rows, images = _embeddings(ctx, ctx.data, split)
    y = rows[ctx.data.task.labels].to_numpy(dtype=float)
    if not (y.sum(1) == 1).all():
        raise UserError(f"retrieval: {ctx.data.name}'s {split} images do not each carry exactly one class")
    if len(rows) <= max(ks):
        raise UserError(f"retrieval: {ctx.data.name}'s {split} split has {len(rows)} images, not more than "
                        f"K={max(ks)}")
    classes = y.argmax(1)
    similarity = images @ images.T
    np.fill_diagonal(similarity, -np.inf)  # a query never retrieves itself
    relevant = classes[:, None] == classes[None, :]
    hits = hits_at(similarity, relevant, ks)
    queries = pd.DataFrame({"query": rows["sample_id"].astype(str), **{f"hits@{k}": hits[k] for k in ks}})
    return _result({"i2i": queries}, ks, {"retrieval": "class-consistent", "items": {"images": len(rows)}})
