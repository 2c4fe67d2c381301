"""The model fine-tuning trains: a copy of a pretrained model's image encoder with a linear head."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.modeling.method import StepOutput


class FineTuneModel(nn.Module):
    """A copy of a model's image encoder (the modules `encode_image` uses; the rest is frozen) and a linear
    head. Speaks the trainer's side of the Method contract: as for a Method, calling it is the training step
    (DDP hooks into `forward`); `logits` and `predict` map images to outputs."""

    def __init__(self, method: nn.Module, n_classes: int, multiclass: bool, encoder_lr_multiplier: float,
                 probe: torch.Tensor):
        super().__init__()
        self.encoder = copy.deepcopy(method)
        trainable = tuple(method.image_modules())
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(name.startswith(trainable))
        self.encoder.eval()
        with torch.no_grad():
            width = self.encoder.encode_image(probe).shape[-1]
        self.head = nn.Linear(width, n_classes)
        self.multiclass, self.multiplier = multiclass, float(encoder_lr_multiplier)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode_image(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images).float()
        return logits.softmax(-1) if self.multiclass else logits.sigmoid()

    def forward(self, batch) -> StepOutput:
        return self.training_step(batch)

    def training_step(self, batch) -> StepOutput:
        logits = self.logits(batch.images).float()
        if self.multiclass:
            loss = F.cross_entropy(logits, batch.labels.argmax(1))
            return StepOutput(loss, {"ce": loss.detach()})
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return StepOutput(loss, {"bce": loss.detach()})

    def no_weight_decay(self) -> set[str]:
        return set()

    def lr_multipliers(self) -> dict[str, float]:
        return {"encoder.": self.multiplier}
