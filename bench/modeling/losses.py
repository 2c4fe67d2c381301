"""Losses shared by methods. The contrastive loss is correct under DDP: it gathers features from every
rank (with gradients) and each rank scores its own rows against the global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on its gradient made contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's own slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    # all_gather's backward exchanges the gradients with gloo's all-to-all, which reads a non-contiguous tensor's
    # memory as if it were contiguous (an einsum's gradient is a permuted view): wrong gradients, no error
    return torch.cat([_ContiguousGrad.apply(part) for part in all_gather(x)], dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an integer tensor from all ranks along dim 0 (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


def rank_weight(count: torch.Tensor) -> torch.Tensor | float:
    """W x count / (count summed over ranks): scales a rank's mean over its own `count` items (masked tokens)
    so that, once DDP averages the ranks' gradients, the result is the mean over the global batch's items.
    1.0 in one process. Every rank must call it (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total = count.detach().float().clone()
    dist.all_reduce(total)
    return count.float() * dist.get_world_size() / total.clamp_min(1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised embeddings; positives are the aligned rows of the global batch.

    `groups` (one id per row; -1 = a caption of its own) makes rows whose captions are the same text
    positives for each other too: the target is spread evenly over them rather than calling a duplicate
    prompt a negative."""
    all_images = gather_with_grad(image_emb)
    all_texts = gather_with_grad(text_emb)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    n = image_emb.shape[0]
    own = torch.arange(n, device=image_emb.device) + rank * n
    logits_per_image = logit_scale * image_emb @ all_texts.T
    logits_per_text = logit_scale * text_emb @ all_images.T
    if groups is None or bool((groups < 0).all()):
        return 0.5 * (F.cross_entropy(logits_per_image, own) + F.cross_entropy(logits_per_text, own))
    ids = torch.where(groups < 0, -(own + 1), groups)
    all_ids = gather_ids(ids)
    target = (ids[:, None] == all_ids[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target))


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` (no gradient) over every rank's elements; every rank must call it (a collective)."""
    total = torch.stack([x.detach().float().sum(), torch.tensor(float(x.numel()), device=x.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total[0] / total[1].clamp_min(1)


def own_rows(n: int, device: torch.device) -> torch.Tensor:
    """This rank's rows' positions in the gathered global batch (every rank holds `n` rows)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return torch.arange(n, device=device) + rank * n


def integrity_contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                               integrity: torch.Tensor | None = None, use: str = "weight") -> torch.Tensor:
    """Symmetric InfoNCE from this rank's logits against the global batch ([n, N] each; pair i is at `own_rows`).

    `integrity` ([n], in (0, 1]) says how much of each pair's image meaning its (masked) view kept (MLIP's
    semantic integrity): `weight` weighs pair i's two terms by it, normalised by its mean over the global batch
    (so the loss keeps its scale and DDP's average of ranks is the global weighted mean); `soften` makes the
    target of pair i put `integrity` on its partner and spread the rest evenly over the other rows."""
    n, total = logits_per_image.shape
    own = own_rows(n, logits_per_image.device)
    if integrity is None:
        return 0.5 * (F.cross_entropy(logits_per_image, own) + F.cross_entropy(logits_per_text, own))
    w = integrity.detach().float()
    if use == "soften":
        rest = ((1 - w) / max(total - 1, 1)).unsqueeze(1)
        target = rest.expand(n, total).clone()
        target[torch.arange(n, device=own.device), own] = w
        return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target))
    per_pair = 0.5 * (F.cross_entropy(logits_per_image, own, reduction="none")
                      + F.cross_entropy(logits_per_text, own, reduction="none"))
    return (w * per_pair).mean() / global_mean(w).clamp_min(1e-6)
