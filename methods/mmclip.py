"""MMCLIP: CLIP + attention-guided masked image modelling (AttMIM) + entity-guided masked language modelling
(EntMLM) + disease-kind prompts for unpaired data (Wu et al., arXiv 2407.19546, ACL 2026).

The paper (its abstract and method figure; no code was released) fixes: a CLIP loss between image and text
encoders; reconstruction of image patches masked where they respond most to the report, with multi-modal
feature interaction; reconstruction of NER-masked report entities with visual support; disease-kind prompts
that let image-only and text-only data join training. Everything else here is our proposal, and each
choice is a switch in configs/method/mmclip.yaml, recorded with every result: encoders, decoder sizes, mask
ratio and attention share, how attention is scored, the entity tagger, prompt templates, loss weights, the
batch mix, and what ITC embeds.

One step, for a batch of paired, image-only (with prompt text) and text-only rows:
1. AttMIM: without gradient, each image's patches are scored by how strongly its text attends to them in the
   joint space; the mask hides the top-scoring patches for `attention_share` of the mask and random ones for
   the rest. The encoder sees only the visible patches (MAE), and an image decoder that attends to the
   masked text predicts the hidden patches' (normalised) pixels.
2. ITC: symmetric InfoNCE between the image embedding (of the whole image, whose pass also gives the AttMIM
   scores, or only of the visible patches, FLIP-style: `contrastive_view`) and the unmasked text, over the
   rows that have both; equal prompts count as one caption.
3. EntMLM: the report with its entity word-pieces hidden goes through the text tower; a text decoder that
   attends to the visible image tokens predicts the hidden pieces. Text-only rows attend to a learned
   "no image" token.
Disabled branches build no modules, so every parameter a configuration has is one it trains.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bench.core.checks import integer, number, one_of
from bench.core.errors import UserError
from bench.core.registry import register_method
from bench.data.batch import Batch, TextBatch
from bench.data.corpus import CorpusCollate
from bench.methods.clip import JOINT_SPACE_CHECKS, add_joint_space
from bench.modeling.decoders import ImageDecoder, TextDecoder, patchify
from bench.modeling.losses import clip_loss, rank_weight
from bench.modeling.masking import IGNORE, TextMasker, mask_counts, select_patches
from bench.modeling.masking import STRATEGIES as TEXT_STRATEGIES
from bench.modeling.method import Method, StepOutput
from bench.modeling.towers import TextTower, VisionTower

ATTENTION_SOURCES = ("cross-attention", "global")
IMAGE_STRATEGIES = ("attention", "random")


@register_method("mmclip")
class MMCLIP(Method):
    setting_checks = {
        **JOINT_SPACE_CHECKS,
        **{f"loss_weights.{k}": number(0) for k in ("itc", "mim", "mlm")},
        "image_masking.strategy": one_of(IMAGE_STRATEGIES),
        "image_masking.mask_ratio": number(0, 1, high_open=True),
        "image_masking.attention_share": number(0, 1),
        "image_masking.attention_source": one_of(ATTENTION_SOURCES),
        "image_masking.min_visible": integer(1),
        "image_masking.contrastive_view": one_of(("visible", "full")),
        "image_masking.hit_rate_every": integer(0, null=True),
        "image_masking.hit_rate_images": integer(1),
        "text_masking.strategy": one_of(TEXT_STRATEGIES),
        "text_masking.entity_mask_prob": number(0, 1),
        "text_masking.random_ratio": number(0, 1),
        "text_masking.vocabulary": one_of(("corpus", "full")),
    }

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if not (m.contrastive or m.image_masking.enabled or m.text_masking.enabled):
            raise UserError(f"method {m.name}: contrastive, image_masking and text_masking are all off; "
                            f"nothing would be trained")
        if m.image_masking.enabled and m.image_masking.strategy == "attention" and not m.contrastive:
            raise UserError("AttMIM (method.image_masking.strategy=attention) scores patches in the contrastive "
                            "joint space; it needs method.contrastive=true")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        m, model = cfg.method, cfg.model
        self.image_tower = VisionTower(model.image)
        self.text_tower = TextTower(model.text, self.tokenizer.vocab_size)
        self.weights = {k: float(m.loss_weights[k]) for k in ("itc", "mim", "mlm")}
        self.itc = bool(m.contrastive)
        self.mim = bool(m.image_masking.enabled)
        self.mlm = bool(m.text_masking.enabled)
        self.joint_space = self.has_joint_space(cfg)
        if self.itc:
            add_joint_space(self, cfg)
        if self.mim:
            im = m.image_masking  # min_visible against the patches the tower has, known once it is built
            mask_counts(self.image_tower.num_patches, im.mask_ratio, im.attention_share, im.min_visible)
            dec = model.image_decoder
            self.patch = self.image_tower.patch_size
            self.image_decoder = ImageDecoder(
                self.image_tower.width, self.image_tower.num_patches, self.patch * self.patch, dec.width,
                dec.layers, dec.heads, self.text_tower.width if m.image_masking.decoder_attends_text else None)
        if self.mlm:
            dec = model.text_decoder
            self.text_decoder = TextDecoder(self.text_tower.width, dec.layers, dec.heads, self.image_tower.width)
            width = self.text_tower.width
            self.mlm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
            self.mlm_out = nn.Linear(width, self.tokenizer.vocab_size)
            embeddings = self.text_tower.encoder.get_input_embeddings()
            if embeddings.weight.shape == self.mlm_out.weight.shape:
                self.mlm_out.weight = embeddings.weight  # tied, as BERT's MLM head
            # the word-pieces MLM chooses among (see prepare); a fixed-size mask, so checkpoints always load
            self.register_buffer("mlm_vocabulary", torch.ones(self.tokenizer.vocab_size, dtype=torch.bool))
        if m.freeze_text:
            self.text_tower.requires_grad_(False)

    # --- what evaluators use -------------------------------------------------------------------------
    @classmethod
    def has_joint_space(cls, cfg: DictConfig) -> bool:
        return bool(cfg.method.contrastive)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)[0]

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        self._require_joint_space()
        return F.normalize(self.image_proj(features), dim=-1)

    def embed_text(self, text: TextBatch) -> torch.Tensor:
        self._require_joint_space()
        return F.normalize(self.text_proj(self.text_tower(text)[0]), dim=-1)

    def _require_joint_space(self) -> None:
        if not self.itc:
            raise UserError(f"method {self.cfg.method.name} has no contrastive branch, so no joint image-text "
                            f"space to embed into")

    def prepare(self, corpus) -> None:
        """With text_masking.vocabulary=corpus, MLM predicts among the word-pieces that occur in the corpus's
        reports (as MRM predicts over its own report vocabulary) instead of the tokenizer's whole vocabulary:
        no target lies outside it, and the softmax over 30k general-English pieces was most of a step's cost."""
        if not self.mlm or self.cfg.method.text_masking.vocabulary == "full":
            return
        reports = [t for kind in ("paired", "text_only") if kind in corpus.pools
                   for t in corpus.pools[kind].texts or []]
        ids = self.tokenizer(reports).input_ids.unique() if reports else torch.zeros(0, dtype=torch.long)
        vocabulary = torch.zeros_like(self.mlm_vocabulary)
        vocabulary[ids] = True
        vocabulary[torch.tensor(self.tokenizer.hf.all_special_ids)] = False
        self.mlm_vocabulary.copy_(vocabulary)

    def make_collate(self) -> CorpusCollate:
        if not self.mlm:
            return CorpusCollate(self.tokenizer)
        t = self.cfg.method.text_masking
        return CorpusCollate(self.tokenizer, TextMasker(self.tokenizer, t.strategy, t.entity_mask_prob,
                                                        t.random_ratio))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"} if self.itc else set()

    # --- training ------------------------------------------------------------------------------------
    def patch_scores(self, patch_tokens: torch.Tensor, text_tokens: torch.Tensor, text: TextBatch,
                     pooled_text: torch.Tensor) -> torch.Tensor:
        """[B, N] how much each image's patches respond to its text (rows aligned), in the joint space.

        cross-attention: every text word-piece attends over the patches (softmax over patches, scaled dot
        product of the projected tokens), and a patch's score is the attention it receives, averaged over the
        word-pieces ([CLS], [SEP] and padding excluded). global: the cosine of each patch with the text's
        embedding."""
        patches = self.image_proj(patch_tokens)
        if self.cfg.method.image_masking.attention_source == "global":
            text_emb = F.normalize(self.text_proj(pooled_text), dim=-1)
            return torch.einsum("bnd,bd->bn", F.normalize(patches, dim=-1), text_emb)
        words = self.text_proj(text_tokens)
        attention = torch.einsum("bld,bnd->bln", words, patches).div(math.sqrt(words.shape[-1])).softmax(-1)
        valid = text.attention_mask.clone().float()
        valid[:, 0] = 0.0  # [CLS]
        valid[torch.arange(len(valid)), text.attention_mask.sum(1) - 1] = 0.0  # [SEP]
        valid = torch.where(valid.sum(1, keepdim=True) > 0, valid, text.attention_mask.float())
        return (attention * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)

    def training_step(self, batch: Batch) -> StepOutput:
        im = self.cfg.method.image_masking
        parts: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        images = batch.images
        pairs = batch.pairs() if images is not None and batch.text is not None else None
        has_pairs = pairs is not None and len(pairs[0]) > 0
        text_out = self.text_tower(batch.text) if self.itc and has_pairs else None
        masked_tokens = mlm_rows = None
        if self.mlm and batch.masked_text is not None:
            # prompts are never masked: their tokens are the ITC pass's, so only the reports are encoded again
            mlm_rows = batch.mlm_rows if batch.mlm_rows is not None and text_out is not None else \
                torch.arange(len(batch.masked_text), device=batch.masked_text.input_ids.device)
            masked_tokens = self.text_tower(_rows(batch.masked_text, mlm_rows))[1]
        # one pass over the whole image with gradient, unless masking is on and ITC embeds the visible patches
        full = self.image_tower(images) if images is not None and (
            not self.mim or (text_out is not None and im.contrastive_view == "full")) else None
        visible_pooled = visible = None
        if self.mim and images is not None:
            mask = self._patch_mask(batch, pairs if has_pairs else None, text_out, full)
            visible_pooled, visible = self.image_tower(images, keep=mask.keep)
            # the text the image decoder consults: the masked report (MRM), else the plain text (and prompts)
            context = text_out[1] if text_out is not None else None
            if masked_tokens is not None:
                context = masked_tokens if context is None else context.index_copy(0, mlm_rows, masked_tokens)
            if context is None and self.image_decoder.memory is not None and batch.text is not None:
                context = self.text_tower(batch.text)[1]
            losses["mim"] = self._mim_loss(batch, mask, visible, context)
            parts["masked_patches"] = mask.masked.float().mean().detach()
        if text_out is not None:
            scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
            image_rows, text_rows = pairs
            pooled = full[0] if full is not None else visible_pooled
            groups = None if batch.text_groups is None else batch.text_groups[text_rows]
            losses["itc"] = clip_loss(F.normalize(self.image_proj(pooled[image_rows]), dim=-1),
                                      F.normalize(self.text_proj(text_out[0][text_rows]), dim=-1), scale, groups)
            parts["logit_scale"] = scale.detach()
        if masked_tokens is not None:
            # the image tokens the text consults: the visible ones when the image is masked, else the whole image's
            image_tokens = visible if visible is not None else full[1] if full is not None else None
            targets = batch.mlm_labels[mlm_rows] != IGNORE
            weight = rank_weight(targets.sum())  # ranks mask different numbers of tokens; weigh to the global mean
            if bool(targets.any()):
                losses["mlm"] = weight * self._mlm_loss(batch, mlm_rows, masked_tokens, image_tokens, targets)
            parts["masked_tokens"] = targets.float().sum().detach() / batch.masked_text.attention_mask.sum()
        if not losses:
            raise UserError(f"batch of {len(batch)} samples gave {self.cfg.method.name} nothing to learn from")
        total = sum(self.weights[k] * v for k, v in losses.items())
        return StepOutput(total, {**{k: v.detach() for k, v in losses.items()}, **parts})

    def _patch_mask(self, batch: Batch, pairs: tuple[torch.Tensor, torch.Tensor] | None, text_out, full,
                    generator: torch.Generator | None = None):
        """AttMIM's mask: images with text are scored against it without gradient (from the ITC pass's
        features, or one no-grad pass over the whole image); images without text, and the random strategy,
        get uniformly random masks. Random draws come from `generator` (None: torch's global RNG, as training)."""
        im = self.cfg.method.image_masking
        n_images, n_patches = batch.images.shape[0], self.image_tower.num_patches
        scores = None
        if im.strategy == "attention" and text_out is not None and pairs is not None:
            image_rows, text_rows = pairs
            with torch.no_grad():
                tokens = full[1].detach() if full is not None else self.image_tower(batch.images)[1]
                scores = torch.rand(n_images, n_patches, device=batch.images.device, generator=generator)
                scores[image_rows] = self.patch_scores(
                    tokens[image_rows], text_out[1][text_rows].detach(), _rows(batch.text, text_rows),
                    text_out[0][text_rows].detach()).float()
        return select_patches(scores, n_images, n_patches, im.mask_ratio, im.attention_share, im.min_visible,
                              batch.images.device, generator)

    @torch.no_grad()
    def mask_probe(self, images: torch.Tensor, texts: list[str], generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """[B, N] bool: the patches image masking hides in each image paired with its text, chosen by the
        training step's own path (`_patch_mask`: AttMIM scores, then `select_patches`; random masks for the
        random strategy), with random draws from `generator` so that measuring never moves training's RNG.
        The caller sets the mode (eval, for a measurement); AttMIM's hit rate is scored on these
        (`bench.modeling.masking.hit_rate`)."""
        if not self.mim:
            raise UserError(f"method {self.cfg.method.name} has image masking off (method.image_masking.enabled="
                            f"false): there is no mask to measure")
        text = self.tokenizer(list(texts)).to(images.device)
        rows = torch.arange(len(text), device=images.device)
        attention = self.itc and self.cfg.method.image_masking.strategy == "attention"
        text_out = self.text_tower(text) if attention else None
        return self._patch_mask(Batch(images, text), (rows, rows), text_out, None, generator).masked

    def _mim_loss(self, batch: Batch, mask, visible: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """MSE on the hidden patches' pixels (the first channel: inputs are grey repeated), each patch
        normalised by its own mean and std when norm_pix_loss."""
        image_text = batch.image_text if batch.image_text is not None else \
            torch.arange(batch.images.shape[0], device=batch.images.device)
        if context is None:
            image_text = torch.full_like(image_text, -1)
        padding = None if context is None else batch.text.attention_mask == 0
        prediction = self.image_decoder(visible, mask.keep, context, padding, image_text)
        target = patchify(batch.images[:, :1].float(), self.patch)
        if self.cfg.method.image_masking.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (prediction.float() - target).pow(2).mean(-1)
        return per_patch[mask.masked].mean()

    def _mlm_loss(self, batch: Batch, rows: torch.Tensor, masked_tokens: torch.Tensor,
                  image_tokens: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the hidden word-pieces of text `rows`, predicted by the text decoder that attends to
        the image (text-only rows attend to the decoder's "no image" token)."""
        if batch.images is None or image_tokens is None:
            text_image = torch.full((len(rows),), -1, dtype=torch.long, device=targets.device)
        else:
            text_image = batch.text_image()[rows]
        padding = batch.masked_text.attention_mask[rows] == 0
        hidden = self.mlm_transform(self.text_decoder(masked_tokens, padding, image_tokens, text_image)[targets])
        labels = batch.mlm_labels[rows][targets]
        if bool(self.mlm_vocabulary.all()):
            return F.cross_entropy(self.mlm_out(hidden).float(), labels)
        if not bool(self.mlm_vocabulary[labels].all()):
            raise UserError("a masked word-piece is outside the MLM vocabulary prepared from the corpus")
        allowed = self.mlm_vocabulary.nonzero().squeeze(1)
        position = torch.cumsum(self.mlm_vocabulary.long(), 0) - 1  # full id -> index among the allowed
        logits = F.linear(hidden, self.mlm_out.weight[allowed], self.mlm_out.bias[allowed])
        return F.cross_entropy(logits.float(), position[labels])


def _rows(text: TextBatch, rows: torch.Tensor) -> TextBatch:
    return TextBatch(text.input_ids[rows], text.attention_mask[rows])
