"""The contract every method plugin fulfils; the trainer and the evaluators only speak to this."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from bench.towers import TextBatch, Tokenizer


@dataclass
class Batch:
    """One training batch. `images` and `text` are aligned pairs; either may be None for unpaired data."""

    images: torch.Tensor | None
    text: TextBatch | None
    sample_ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            None if self.images is None else self.images.to(device, non_blocking=non_blocking),
            None if self.text is None else self.text.to(device, non_blocking=non_blocking),
            self.sample_ids,
        )

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


class Method(nn.Module):
    """Base class of a pre-training method.

    A subclass registers itself with `@register_method("name")`, builds its modules from `cfg.method` and
    `cfg.model`, and implements `training_step`. The encoders below are what every evaluator uses.
    """

    name: str = ""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model.text.tokenizer, cfg.model.text.max_length)

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features before any projection (linear probe, fine-tuning)."""
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding in the joint space (zero-shot)."""
        raise NotImplementedError

    def embed_text(self, text: TextBatch) -> torch.Tensor:
        """L2-normalised text embedding in the joint space (zero-shot)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of extra parameters that must not be decayed (norms and biases are excluded anyway)."""
        return set()
