"""The model the segmentation protocol trains: a copy of a pretrained model's image encoder, frozen or fine-tuned,
and a light decoder over its patch tokens."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import UserError
from bench.modeling.method import StepOutput


class ProgressiveDecoder(nn.Module):
    """SETR-PUP-style progressive upsampling (Zheng et al. 2021, as MGCA's ViT segmenter): the patch tokens as a
    grid, then stages of 3x3 convolution, batch norm, ReLU and 2x bilinear upsampling, halving the channels each
    time, until the grid is at least half the image; a 1x1 convolution to one logit and a final bilinear
    resize to the image's exact size."""

    def __init__(self, in_width: int, width: int, patch_size: int):
        super().__init__()
        stages = max(1, math.ceil(math.log2(patch_size)) - 1)
        layers: list[nn.Module] = []
        channels = in_width
        for i in range(stages):
            out = max(16, width >> i)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            channels = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, tokens: torch.Tensor, grid: int, size: int) -> torch.Tensor:
        """[B, N, W] patch tokens (row-major, N = grid^2) -> [B, size, size] logits."""
        b, _, w = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, w, grid, grid)
        x = self.head(self.stages(x))
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - the soft Dice of each image (sigmoid probabilities against the true mask), averaged over images;
    `eps` keeps an empty mask predicted empty near 0 loss."""
    p = logits.sigmoid().flatten(1)
    t = masks.flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


class SegmentationModel(nn.Module):
    """A copy of a model's image encoder (frozen, or with `fine_tune` its image modules trained at
    `encoder_lr_multiplier` times the decoder's learning rate) and a `ProgressiveDecoder`. Speaks the trainer's
    side of the Method contract; the loss is BCE + soft Dice per image (`dice_weight`)."""

    def __init__(self, method: nn.Module, decoder_width: int, fine_tune: bool, encoder_lr_multiplier: float,
                 dice_weight: float):
        super().__init__()
        if not hasattr(method, "encode_patches"):
            raise UserError(f"segmentation reads the image encoder's patch tokens; {type(method).__name__} has no "
                            f"encode_patches")
        self.encoder = copy.deepcopy(method)
        trainable = tuple(method.image_modules()) if fine_tune else ()
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(bool(trainable) and name.startswith(trainable))
        self.encoder.eval()
        self.fine_tune = fine_tune
        tower = self.encoder.image_tower
        self.size, self.grid = int(tower.image_size), int(tower.image_size // tower.patch_size)
        self.decoder = ProgressiveDecoder(tower.width, decoder_width, int(tower.patch_size))
        self.multiplier, self.dice_weight = float(encoder_lr_multiplier), float(dice_weight)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if not self.fine_tune:
            self.encoder.eval()  # a frozen encoder stays in eval mode (no dropout, no norm statistics drift)
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            tokens = self.encoder.encode_patches(images)
        return self.decode(tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, W] patch tokens -> [B, size, size] logits (the decoder alone: a frozen encoder's tokens can be
        computed once)."""
        return self.decoder(tokens, self.grid, self.size)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).float().sigmoid()

    def forward(self, batch) -> StepOutput:
        return self.training_step(batch)

    def training_step(self, batch) -> StepOutput:
        logits = self.logits(batch.images).float()
        masks = batch.labels.float()
        bce = F.binary_cross_entropy_with_logits(logits, masks)
        dice = soft_dice_loss(logits, masks)
        loss = bce + self.dice_weight * dice
        return StepOutput(loss, {"bce": bce.detach(), "dice_loss": dice.detach()})

    def no_weight_decay(self) -> set[str]:
        return set()

    def lr_multipliers(self) -> dict[str, float]:
        return {"encoder.": self.multiplier}
