"""Decoders of masked modelling: an MAE-style image decoder and an MLM text decoder, each able to attend to
the other modality's tokens. Built from torch's pre-norm transformer layers; a sample without the other
modality attends to one learned "nothing" token instead. MRM's own report conditioning, one pooled image
latent added to the masked report's token embeddings, is `PooledImageLatent` with `encode_with_offset`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.core.errors import UserError
from bench.data.batch import TextBatch


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


class PooledImageLatent(nn.Module):
    """MRM's image conditioning of report MLM: the mean of an image's (visible) patch latents, projected to the
    text width (the mean of the projections: the projection is affine)."""

    def __init__(self, image_width: int, text_width: int):
        super().__init__()
        self.proj = nn.Linear(image_width, text_width)

    def forward(self, image_tokens: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """[T, text width] for text rows whose image row is `index` (-1: no image, so zeros: the plain text)."""
        if image_tokens is None:
            return torch.zeros(index.shape[0], self.proj.out_features, device=index.device)
        latent = self.proj(image_tokens.mean(1))[index.clamp_min(0)]
        return latent * (index >= 0).unsqueeze(-1).to(latent.dtype)


def encode_with_offset(encoder: nn.Module, text: TextBatch, offset: torch.Tensor) -> torch.Tensor:
    """[B, L, width] token features of a Hugging Face encoder whose embedding output (after its LayerNorm and
    dropout, where MRM adds its image latent) gets `offset` [B, width] added at every position. The hook lives
    only for this eager call, so a compiled tower's other passes never see it."""
    embeddings = getattr(encoder, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        raise UserError(f"text tower {type(encoder).__name__} has no `embeddings` module to add the image latent "
                        f"to; use method.text_masking.conditioning=cross-attention")
    handle = embeddings.register_forward_hook(lambda _module, _args, out: out + offset.unsqueeze(1).to(out.dtype))
    try:
        return encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
    finally:
        handle.remove()


def mlm_cross_entropy(hidden: torch.Tensor, out: nn.Linear, vocabulary: torch.Tensor, labels: torch.Tensor
                      ) -> torch.Tensor:
    """Cross-entropy of MLM states `hidden` [n, width] against word-piece ids `labels` [n], over the ids
    `vocabulary` ([vocab] bool) allows: the output layer's rows of the others are never computed."""
    if bool(vocabulary.all()):
        return F.cross_entropy(out(hidden).float(), labels)
    if not bool(vocabulary[labels].all()):
        raise UserError("a masked word-piece is outside the MLM vocabulary prepared from the corpus")
    allowed = vocabulary.nonzero().squeeze(1)
    position = torch.cumsum(vocabulary.long(), 0) - 1  # full id -> index among the allowed
    logits = F.linear(hidden, out.weight[allowed], out.bias[allowed])
    return F.cross_entropy(logits.float(), position[labels])


def tower_and_target(images: torch.Tensor | None, size: int, scale: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(what the towers see, what the image decoder reconstructs) of a batch. With `scale` s > 1 (MRM's
    super-resolution target) the images come at s times the tower's `size`; the towers see them resized down,
    as MRM's encoder sees its 448px inputs at 224, and each patch's target is its s*p x s*p pixels of the
    large image."""
    if images is None or scale == 1:
        return images, images
    if tuple(images.shape[-2:]) != (size * scale, size * scale):
        raise UserError(f"method.image_masking.target_scale={scale} reconstructs {size * scale}px images, but the "
                        f"corpus gave {images.shape[-1]}px ones: it must load images at the method's "
                        f"corpus_image_size")
    small = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return small.to(images.dtype), images


def masked_patch_loss(prediction: torch.Tensor, target_images: torch.Tensor, patch: int, masked: torch.Tensor,
                      norm_pix_loss: bool) -> torch.Tensor:
    """MSE of an image decoder's `prediction` [B, N, p*p] on the hidden patches (`masked` [B, N]) of
    `target_images`' first channel (inputs are grey repeated), each patch normalised by its own mean and std
    when `norm_pix_loss` (MAE)."""
    target = patchify(target_images[:, :1].float(), patch)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return (prediction.float() - target).pow(2).mean(-1)[masked].mean()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order (the ViT's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
