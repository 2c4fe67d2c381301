"""The contract every method plugin fulfils; the trainer and the evaluators only speak to this."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from bench.core.checks import Check
from bench.data.batch import Batch, TextBatch
from bench.data.corpus import CorpusCollate
from bench.modeling.towers import Tokenizer


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
    # the method.* settings that shape the untrained weights the evaluators read (`evaluated_modules`); None: all
    # of them. The random-init baseline is keyed by these and the model's configuration, so configurations that
    # differ only in what training does (a method's ablations) share one (tests/test_evaluation.py checks the
    # shipped methods' lists against the weights themselves)
    init_settings: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse, with a UserError, switches that are valid one by one but not together; called before any work."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model.text.tokenizer, cfg.model.text.max_length)

    @classmethod
    def corpus_image_size(cls, cfg: DictConfig) -> int:
        """The side of the pretraining corpus's images: the image tower's, unless the method needs more (MRM's
        super-resolution target)."""
        return int(cfg.model.image.image_size)

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

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, width] the image encoder's patch tokens in row-major grid order (segmentation's decoder reads
        them)."""
        return self.image_tower(images)[1]

    def image_modules(self) -> tuple[str, ...]:
        """Names of the submodules `encode_image` runs through: fine-tuning trains these (and a head) only."""
        return ("image_tower",)

    def evaluated_modules(self) -> tuple[str, ...]:
        """Names of the submodules (and parameters) the evaluators read: `image_modules`, and with a joint space
        the text tower, both projections and the temperature (the names `methods/clip.py`'s add_joint_space
        gives them); the random-init baseline's record names their untrained weights by digest."""
        joint = ("text_tower", "image_proj", "text_proj", "logit_scale") if self.has_joint_space(self.cfg) else ()
        return (*self.image_modules(), *joint)

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
        """Called once with the pretraining corpus (bench/data/corpus.py) before training starts; for what a method
        derives from its data, such as an output vocabulary. Anything it sets must live in the state dict."""

    def make_collate(self):
        """Corpus items -> Batch (bench/data/corpus.py); methods that mask text pass a TextMasker."""
        return CorpusCollate(self.tokenizer)

    def no_weight_decay(self) -> set[str]:
        """Names of extra parameters that must not be decayed (norms and biases are excluded anyway)."""
        return set()

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier (the longest matching prefix wins; default 1)."""
        return {}
