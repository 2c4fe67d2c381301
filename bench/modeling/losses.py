"""Losses shared by methods. The contrastive loss is correct under DDP: it gathers features from every
rank (with gradients) and each rank scores its own rows against the global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's own slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


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
