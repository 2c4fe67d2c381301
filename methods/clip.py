"""CLIP / ConVIRT-style baseline: two towers, linear projections, symmetric InfoNCE, learnable temperature."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bench.core.checks import Check, number, one_of
from bench.core.registry import register_method
from bench.data.batch import Batch, TextBatch
from bench.data.corpus import PAIRINGS
from bench.modeling.losses import clip_loss
from bench.modeling.method import Method, StepOutput
from bench.modeling.towers import TextTower, VisionTower

# the switches of the joint space (temperature) that every method with one shares
JOINT_SPACE_CHECKS = {"temperature": number(0, low_open=True), "max_logit_scale": number(1, low_open=True)}


def add_joint_space(method: Method, cfg: DictConfig) -> None:
    """The projections of both towers into the joint space and the learnable temperature, as attributes of
    `method` (so every method that has them names them alike in checkpoints)."""
    m, dim = cfg.method, cfg.model.embed_dim
    method.image_proj = nn.Linear(method.image_tower.width, dim, bias=False)
    method.text_proj = nn.Linear(method.text_tower.width, dim, bias=False)
    method.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / m.temperature)), requires_grad=m.learn_temperature)
    method.max_logit_scale = math.log(m.max_logit_scale)


class JointSpaceEncoders:
    """The evaluators' side of a method whose towers and joint space are named as `add_joint_space` names them:
    the image tower's pooled features, and both towers' L2-normalised projections."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)[0]

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(features), dim=-1)

    def embed_text(self, text: TextBatch) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(text)[0]), dim=-1)


@register_method("clip")
class CLIP(JointSpaceEncoders, Method):
    setting_checks: ClassVar[dict[str, Check]] = {**JOINT_SPACE_CHECKS, "pairing": one_of(PAIRINGS)}
    init_settings = ("temperature",)  # the towers come from the model's config; the logit scale from this

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        m = cfg.method
        self.image_tower = VisionTower(cfg.model.image)
        self.text_tower = TextTower(cfg.model.text, self.tokenizer.vocab_size)
        add_joint_space(self, cfg)
        if m.freeze_text:
            self.text_tower.requires_grad_(False)

    def training_step(self, batch: Batch) -> StepOutput:
        scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
        loss = clip_loss(self.embed_image(batch.images), self.embed_text(batch.text), scale)
        return StepOutput(loss, {"itc": loss.detach(), "logit_scale": scale.detach()})

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}
