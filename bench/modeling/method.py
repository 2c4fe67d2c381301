"""The contract every method plugin fulfils; the trainer and the evaluators only speak to this."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from bench.experiment.config_checks import Check
from bench.modeling.towers import TextBatch, Tokenizer


@dataclass
class Batch:
    """One training batch (see bench/corpus.py). Rows with an image are in `images`, rows with text in `text`;
    `image_text[i]` is the text row of image i, -1 when it has none (None: images and texts are aligned
    pairs). `text_groups` marks texts that are the same caption (equal ids are positives for each other).
    Masked modelling adds `masked_text`, the same rows with hidden pieces replaced by [MASK], and
    `mlm_labels`, the hidden pieces' ids (-100 elsewhere); `mlm_rows` are the text rows MLM may mask (the
    reports, not the prompts; None: every row), the only ones a method needs to encode masked. Fine-tuning batches carry `labels`, the task's
    label vector per image."""

    images: torch.Tensor | None
    text: TextBatch | None
    sample_ids: list[str] = field(default_factory=list)
    image_text: torch.Tensor | None = None
    text_groups: torch.Tensor | None = None
    masked_text: TextBatch | None = None
    mlm_labels: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    mlm_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return Batch(move(self.images), move(self.text), self.sample_ids, move(self.image_text),
                     move(self.text_groups), move(self.masked_text), move(self.mlm_labels), move(self.labels),
                     move(self.mlm_rows))

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image rows, their text rows) of the samples that have both."""
        if self.image_text is None:
            rows = torch.arange(len(self.text), device=self.text.input_ids.device)
            return rows, rows
        has = self.image_text >= 0
        return has.nonzero().squeeze(1), self.image_text[has]

    def text_image(self) -> torch.Tensor:
        """For each text row, its image row (-1: a text-only sample)."""
        n = len(self.text)
        out = torch.full((n,), -1, dtype=torch.long, device=self.text.input_ids.device)
        images, texts = self.pairs()
        out[texts] = images
        return out

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
    joint_space: bool = True  # False: no image-text embedding space, so no zero-shot evaluation
    # valid values of its switches (method.<key>), checked with the rest of the configuration before any work
    # (bench.experiment.config_checks); a switch without one is checked against its default's type
    setting_checks: ClassVar[dict[str, Check]] = {}

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse, with a UserError, switches that are valid one by one but not together; called before any work."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model.text.tokenizer, cfg.model.text.max_length)

    @classmethod
    def has_joint_space(cls, cfg: DictConfig) -> bool:
        """Whether the method configured by `cfg` has a joint space, known before building it (for plans)."""
        return cls.joint_space

    def forward(self, batch: Batch) -> StepOutput:
        # DDP hooks into forward(), so the wrapped model's call is the training step
        return self.training_step(batch)

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features before any projection (linear probe, fine-tuning)."""
        raise NotImplementedError

    def image_modules(self) -> tuple[str, ...]:
        """Names of the submodules `encode_image` runs through: fine-tuning trains these (and a head) only."""
        return ("image_tower",)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """`encode_image`'s features -> the L2-normalised joint-space embedding (zero-shot reuses the features
        the linear probe caches, so each image is encoded once)."""
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding in the joint space (zero-shot)."""
        return self.project_image(self.encode_image(images))

    def embed_text(self, text: TextBatch) -> torch.Tensor:
        """L2-normalised text embedding in the joint space (zero-shot)."""
        raise NotImplementedError

    def prepare(self, corpus) -> None:
        """Called once with the pretraining corpus (bench/corpus.py) before training starts; for what a method
        derives from its data, such as an output vocabulary. Anything it sets must live in the state dict."""

    def make_collate(self):
        """Corpus items -> Batch (bench/corpus.py); methods that mask text pass a TextMasker."""
        from bench.data.corpus import CorpusCollate

        return CorpusCollate(self.tokenizer)

    def no_weight_decay(self) -> set[str]:
        """Names of extra parameters that must not be decayed (norms and biases are excluded anyway)."""
        return set()

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier (the longest matching prefix wins; default 1)."""
        return {}
