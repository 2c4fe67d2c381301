"""Supervised pretraining, the positive control: the image tower trained on the corpus's labels with a multi-label
BCE, no text at all (the ImageNet/CheXpert-supervised initialisation papers report beside image-text methods).

Its images are the corpus's paired images (MIMIC-CXR, with the CheXpert labeler's values of the study) and its
image-only images (PadChest's training split, its findings mapped to the 14 observations): `unpaired: true`
reads both, and text-only sources are left out (bench/experiment/pretraining.py). Label policy, one head per
entry of `method.labels` (the 14 CheXpert observations):
- 1 positive, 0 negative; blank (not mentioned) counts as 0, as every adapter's evaluation labels count it;
- -1 uncertain: `method.uncertain` = ignore (masked out of the loss: U-Ignore, the default), zeros or ones;
- a head the sample's source does not label (e.g. CheXpert's adapter, as an image-only source, gives its 5
  competition labels) is masked.
The loss is the mean BCE over the batch's unmasked (image, head) entries, so a sample without a usable label
trains nothing. The same VisionTower preset as every method, so linear probe and fine-tuning read its features
the same way; no joint space, so no zero-shot.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bench.core.checks import Check, list_of, one_of, text
from bench.core.registry import register_method
from bench.data.batch import Batch
from bench.data.corpus import KINDS, CorpusItem
from bench.modeling.losses import rank_weight
from bench.modeling.method import Method, StepOutput
from bench.modeling.towers import VisionTower

UNCERTAIN = ("ignore", "zeros", "ones")  # what an uncertain (-1) label becomes


def label_targets(values: np.ndarray, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
    """Label-head values (1, 0, -1 uncertain, NaN unlabelled; see Pool.head_labels) -> (0/1 targets, which
    count), under the policy for uncertain labels."""
    targets = (values == 1).astype(np.float32)
    valid = (values == 1) | (values == 0)
    if uncertain != "ignore":
        valid |= values == -1
        if uncertain == "ones":
            targets[values == -1] = 1.0
    return targets, valid


class LabelCollate:
    """Corpus items -> Batch of the images with their label targets and mask; no text is tokenised. An item
    without label values (a stand-in batch's) has every head masked."""

    def __init__(self, heads: int, uncertain: str):
        self.heads, self.uncertain = heads, uncertain

    def __call__(self, items: list[CorpusItem]) -> Batch:
        items = sorted((it for it in items if it.image is not None), key=lambda it: KINDS.index(it.kind))
        unlabelled = np.full(self.heads, np.nan, dtype=np.float32)
        values = np.stack([it.heads if it.heads is not None else unlabelled for it in items]) \
            if items else np.zeros((0, self.heads), dtype=np.float32)
        targets, valid = label_targets(values, self.uncertain)
        images = torch.stack([it.image for it in items]) if items else None
        return Batch(images, None, [it.sample_id for it in items], labels=torch.from_numpy(targets),
                     label_mask=torch.from_numpy(valid))


@register_method("supervised")
class Supervised(Method):
    """The image tower and one linear head per label (`method.labels`), trained with masked multi-label BCE."""

    joint_space = False
    setting_checks: ClassVar[dict[str, Check]] = {"labels": list_of(text(), nonempty=True, distinct=True),
                                                  "uncertain": one_of(UNCERTAIN)}
    init_settings = ()  # the evaluators read the image tower alone, built from the model's config

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.image_tower = VisionTower(cfg.model.image)
        self.head = nn.Linear(self.image_tower.width, len(cfg.method.labels))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)[0]

    def make_collate(self) -> LabelCollate:
        return LabelCollate(len(self.cfg.method.labels), str(self.cfg.method.uncertain))

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.head(self.image_tower(batch.images)[0]).float()
        mask = batch.label_mask.float()
        count = mask.sum()
        # the mean over this rank's unmasked entries, reweighed so that DDP's average is the global batch's mean;
        # a batch without any usable label gives 0 with a gradient of 0 (every parameter still takes part)
        per_entry = F.binary_cross_entropy_with_logits(logits, batch.labels.float(), reduction="none")
        loss = rank_weight(count) * (per_entry * mask).sum() / count.clamp_min(1)
        return StepOutput(loss, {"bce": loss.detach(), "labelled": (count / mask.numel()).detach()})
