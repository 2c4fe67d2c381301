import math

import numpy as np
import torch

from bench.modeling.losses import clip_loss


def _reference(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE written out with explicit loops."""
    n = len(img)
    logits = scale * img @ txt.T
    total = 0.0
    for i in range(n):
        row, col = logits[i], logits[:, i]
        total += -(row[i] - math.log(np.exp(row).sum())) - (col[i] - math.log(np.exp(col).sum()))
    return total / (2 * n)


def test_clip_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    got = clip_loss(img, txt, torch.tensor(7.0))
    assert abs(float(got) - _reference(img.numpy(), txt.numpy(), 7.0)) < 1e-5


def test_aligned_pairs_have_low_loss_and_shuffled_pairs_high():
    emb = torch.nn.functional.normalize(torch.eye(8)[:, :8] + 0.01, dim=-1)
    aligned = clip_loss(emb, emb, torch.tensor(50.0))
    shuffled = clip_loss(emb, emb.roll(1, 0), torch.tensor(50.0))
    assert aligned < 0.01 < math.log(8) < shuffled


def test_gradients_reach_both_towers_and_the_temperature():
    img = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1).requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    clip_loss(img, txt, scale).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and scale.grad is not None


def test_equal_captions_are_positives_for_each_other():
    """Rows 0 and 1 share a caption (group 7): the target spreads over both, which the loss matches when
    written out; all -1 is plain InfoNCE."""
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    groups = torch.tensor([7, 7, -1, -1])
    logits = 5.0 * img @ txt.T
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    assert abs(float(clip_loss(img, txt, torch.tensor(5.0), groups)) - float(expected)) < 1e-5
    plain = clip_loss(img, txt, torch.tensor(5.0))
    assert float(clip_loss(img, txt, torch.tensor(5.0), torch.full((4,), -1))) == float(plain)
