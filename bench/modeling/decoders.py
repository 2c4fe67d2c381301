"""Decoders of masked modelling: an MAE-style image decoder and an MLM text decoder, each able to attend to
the other modality's tokens (MRM's cross-modal reconstruction). Built from torch's pre-norm transformer
layers; a sample without the other modality attends to one learned "nothing" token instead.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _run(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`module.layers` in turn, each under activation checkpointing when `module.checkpointing` is set."""
    recompute = module.checkpointing and module.training and torch.is_grad_enabled()
    for layer in module.layers:
        x = checkpoint(layer, x, *args, use_reentrant=False, **kwargs) if recompute else layer(x, *args, **kwargs)
    return x


def _layers(width: int, heads: int, depth: int, cross_attention: bool) -> nn.ModuleList:
    kind = nn.TransformerDecoderLayer if cross_attention else nn.TransformerEncoderLayer
    return nn.ModuleList(kind(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                              norm_first=True) for _ in range(depth))


class CrossMemory(nn.Module):
    """Projects the other modality's tokens to this decoder's width and picks, for each query row, the row
    of those tokens it may attend to (`index` -1: none, so the learned null token)."""

    def __init__(self, source_width: int, width: int):
        super().__init__()
        self.proj = nn.Linear(source_width, width)
        self.null = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, tokens: torch.Tensor | None, padding: torch.Tensor | None, index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory [B, M, width], key padding [B, M], True = ignore) for query rows B."""
        rows = index.shape[0]
        null = self.null.expand(rows, 1, -1)
        has = index >= 0
        if tokens is None:
            return null, torch.zeros(rows, 1, dtype=torch.bool, device=index.device)
        # rows without tokens see the null token and padding; no test for "none has any" (it would wait for the GPU)
        memory = self.proj(tokens[index.clamp_min(0)])
        pad = padding[index.clamp_min(0)].clone() if padding is not None else \
            torch.zeros(memory.shape[:2], dtype=torch.bool, device=memory.device)
        memory = torch.where(has[:, None, None], memory, torch.cat(
            [null, torch.zeros_like(memory[:, 1:])], dim=1))
        pad[~has] = True
        pad[~has, 0] = False
        return memory, pad


class ImageDecoder(nn.Module):
    """Visible-patch latents + mask tokens at the hidden positions -> per-patch pixel predictions."""

    def __init__(self, encoder_width: int, num_patches: int, patch_pixels: int, width: int, depth: int,
                 heads: int, text_width: int | None = None):
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, num_patches, width))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        self.memory = CrossMemory(text_width, width) if text_width else None
        self.layers = _layers(width, heads, depth, cross_attention=self.memory is not None)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_pixels)
        self.checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = enabled

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, text_tokens: torch.Tensor | None = None,
                text_padding: torch.Tensor | None = None, text_index: torch.Tensor | None = None) -> torch.Tensor:
        b, n = visible.shape[0], self.position.shape[1]
        x = self.mask_token.expand(b, n, -1).to(visible.dtype)
        x = x.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), self.embed(visible).to(x.dtype))
        x = x + self.position
        if self.memory is not None:
            memory, pad = self.memory(text_tokens, text_padding, text_index)
            x = _run(self, x, memory, memory_key_padding_mask=pad)
        else:
            x = _run(self, x)
        return self.head(self.norm(x))


class TextDecoder(nn.Module):
    """Masked report tokens (from the text tower) that attend to image tokens -> hidden states for an MLM head."""

    def __init__(self, width: int, depth: int, heads: int, image_width: int):
        super().__init__()
        self.memory = CrossMemory(image_width, width)
        self.layers = _layers(width, heads, depth, cross_attention=True)
        self.norm = nn.LayerNorm(width)
        self.checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = enabled

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor, image_tokens: torch.Tensor | None,
                image_index: torch.Tensor) -> torch.Tensor:
        memory, memory_pad = self.memory(image_tokens, None, image_index)
        x = _run(self, tokens, memory, tgt_key_padding_mask=padding, memory_key_padding_mask=memory_pad)
        return self.norm(x)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order (the ViT's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
