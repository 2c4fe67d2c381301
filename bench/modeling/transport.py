"""Entropic optimal transport between image patches and report sentences (MLIP's patch-sentence matching).

`sinkhorn` solves min <T, C> - eps H(T) subject to T 1 = a, T^T 1 = b in the log domain (stable for small eps),
batched over any leading dimensions; a zero mass in `b` (a padded sentence) gets no transport. `local_similarity`
scores every image against every report by the plan-weighted cosine of its patches and the report's sentences:
the plan spreads each image's mass over the sentences many-to-many, so a patch can serve several sentences and
a sentence several patches.
"""
from __future__ import annotations

import torch


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """The entropic transport plan [..., n, m] of `cost` [..., n, m] between marginals `a` [..., n] and `b`
    [..., m] (each summing to the same total; zeros allowed in `b`), after `iterations` Sinkhorn updates."""
    log_a, log_b = a.clamp_min(0).log(), b.clamp_min(0).log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    scaled = -cost / eps
    for _ in range(iterations):
        f = eps * (log_a - torch.logsumexp(scaled + g.unsqueeze(-2) / eps, dim=-1))
        g = eps * (log_b - torch.logsumexp(scaled + f.unsqueeze(-1) / eps, dim=-2))
        g = torch.where(torch.isfinite(log_b), g, torch.full_like(g, -torch.inf))
    return torch.exp(scaled + (f.unsqueeze(-1) + g.unsqueeze(-2)) / eps)


def local_similarity(patches: torch.Tensor, sentences: torch.Tensor, present: torch.Tensor, eps: float,
                     iterations: int, plan_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """([I, R] local similarity, [I, R, n, m] plans) of images' L2-normalised `patches` [I, n, d] with reports'
    L2-normalised `sentences` [R, m, d] (`present` [R, m]: which sentence slots hold a sentence).

    For each image i and report r the plan moves mass 1/n from each patch to the report's sentences, 1/m_r
    each (uniform marginals), at cost 1 - cosine; the similarity is the plan-weighted cosine, so it lies in
    [-1, 1] like a global cosine. The plan is a fixed weighting (no gradient) unless `plan_grad`. A report
    without sentences scores 0 with every image."""
    cosine = torch.einsum("ind,rmd->irnm", patches, sentences)
    n, counts = patches.shape[1], present.sum(1)
    a = torch.full(cosine.shape[:3], 1.0 / n, dtype=cosine.dtype, device=cosine.device)
    b = (present.to(cosine.dtype) / counts.clamp_min(1).unsqueeze(1).to(cosine.dtype)).expand(cosine.shape[0], -1, -1)
    has = counts > 0
    with torch.set_grad_enabled(plan_grad and torch.is_grad_enabled()):
        c = cosine if plan_grad else cosine.detach()
        # a report without sentences is given a uniform dummy marginal, then scored 0 below
        b = torch.where(has[None, :, None], b, torch.full_like(b, 1.0 / b.shape[-1]))
        plan = sinkhorn(1.0 - c.float(), a.float(), b.float(), eps, iterations)
    # in fp32: a plan's entries are about 1 / (n m), too fine for bf16
    similarity = (plan * cosine.float()).sum((-1, -2)).to(cosine.dtype)
    return torch.where(has[None, :], similarity, torch.zeros_like(similarity)), plan
