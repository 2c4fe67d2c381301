"""MMCLIP: CLIP + attention-guided masked image modelling (AttMIM) + entity-guided masked language modelling
(EntMLM) + disease-kind prompts for unpaired data (Wu et al., arXiv 2407.19546, ACL 2026).

The paper (its abstract and method figure; no code was released) fixes: a CLIP loss between image and text
encoders; reconstruction of image patches masked where they respond most to the report, with multi-modal
feature interaction; reconstruction of NER-masked report entities with visual support; disease-kind prompts
that let image-only and text-only data join training. Everything else here is our proposal, and each
choice is a switch in configs/method/mmclip.yaml, recorded with every result: encoders, decoder sizes, mask
ratio and attention share, how attention is scored (and which axis its softmax normalises), the entity
tagger and whether negated entities are masked, prompt templates (and whether paired rows get one too),
loss weights, the batch mix, what ITC embeds, what each decoder reads.

One step, for a batch of paired, image-only (with prompt text) and text-only rows:
1. AttMIM: without gradient, each image's patches are scored by how strongly its text attends to them in the
   joint space; the mask hides the top-scoring patches for `attention_share` of the mask and random ones for
   the rest. The encoder sees only the visible patches (MAE), and an image decoder that attends to the
   report as EntMLM masks it (`decoder_text`) predicts the hidden patches' (normalised) pixels.
2. ITC: symmetric InfoNCE between the image embedding (of the whole image, whose pass also gives the AttMIM
   scores, or only of the visible patches, FLIP-style: `contrastive_view`) and the unmasked text, over the
   rows that have both; equal prompts count as one caption.
3. EntMLM: the report with its entity word-pieces hidden goes through the text tower; a text decoder that
   attends to the visible image tokens (or the whole image's: `decoder_image`) predicts the hidden pieces.
   Text-only rows attend to a learned "no image" token.
Disabled branches build no modules, so every parameter a configuration has is one it trains; the text
masker still runs without EntMLM when the image decoder reads the masked report.

`mrm` (methods/mrm.py) is this class with MRM's choices: random masks, an image decoder without text, the
report MLM conditioned on the pooled visible-patch latent (`conditioning: pooled-latent`), and optionally
MRM's 2x super-resolution target (`target_scale`).
"""
from __future__ import annotations

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
from bench.modeling.decoders import (
    ImageDecoder,
    PooledImageLatent,
    TextDecoder,
    encode_with_offset,
    masked_patch_loss,
    mlm_cross_entropy,
    tower_and_target,
)
from bench.modeling.losses import clip_loss, rank_weight
from bench.modeling.masking import IGNORE, SOFTMAX_AXES, TextMasker, attention_scores, mask_counts, select_patches
from bench.modeling.masking import STRATEGIES as TEXT_STRATEGIES
from bench.modeling.method import Method, StepOutput
from bench.modeling.towers import TextTower, VisionTower

ATTENTION_SOURCES = ("cross-attention", "global")
IMAGE_STRATEGIES = ("attention", "random")
CONDITIONINGS = ("cross-attention", "pooled-latent")


def _boolean(key: str, value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


@register_method("mmclip")
class MMCLIP(Method):
    # the towers come from the model's config and are built first; contrastive decides whether the projections
    # (and temperature) exist, temperature their logit scale; every other switch builds modules after them
    init_settings = ("temperature", "contrastive")
    setting_checks = {
        **JOINT_SPACE_CHECKS,
        **{f"loss_weights.{k}": number(0) for k in ("itc", "mim", "mlm")},
        "image_masking.strategy": one_of(IMAGE_STRATEGIES),
        "image_masking.mask_ratio": number(0, 1, high_open=True),
        "image_masking.attention_share": number(0, 1),
        "image_masking.attention_source": one_of(ATTENTION_SOURCES),
        "image_masking.attention_softmax": one_of(SOFTMAX_AXES),
        "image_masking.min_visible": integer(1),
        "image_masking.contrastive_view": one_of(("visible", "full")),
        "image_masking.decoder_text": one_of(("masked", "plain")),
        "image_masking.target_scale": integer(1, 4),
        "image_masking.hit_rate_every": integer(0, null=True),
        "image_masking.hit_rate_images": integer(1),
        "text_masking.strategy": one_of(TEXT_STRATEGIES),
        "text_masking.entity_mask_prob": number(0, 1),
        "text_masking.random_ratio": number(0, 1),
        "text_masking.mask_negated": _boolean,
        "text_masking.decoder_image": one_of(("visible", "full")),
        "text_masking.conditioning": one_of(CONDITIONINGS),
        "text_masking.vocabulary": one_of(("corpus", "full")),
        "prompts.paired": _boolean,
    }

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        im, tm = m.image_masking, m.text_masking
        if not (m.contrastive or im.enabled or tm.enabled):
            raise UserError(f"method {m.name}: contrastive, image_masking and text_masking are all off; "
                            f"nothing would be trained")
        if im.enabled and im.strategy == "attention" and not m.contrastive:
            raise UserError("AttMIM (method.image_masking.strategy=attention) scores patches in the contrastive "
                            "joint space; it needs method.contrastive=true")
        if tm.enabled and tm.decoder_image == "visible" and not im.enabled:
            raise UserError("method.text_masking.decoder_image=visible: with method.image_masking.enabled=false "
                            "no patch is hidden, so the text branch sees the whole image; set it to full")
        if m.prompts.paired and not (m.prompts.enabled and m.contrastive):
            raise UserError("method.prompts.paired=true contrasts paired images with their disease-kind prompts; "
                            "it needs method.prompts.enabled=true and method.contrastive=true")

    @classmethod
    def corpus_image_size(cls, cfg: DictConfig) -> int:
        """The side of the images the pretraining corpus must hand over: `target_scale` times the tower's (MRM's
        super-resolution target, reconstructed from the large image the towers see resized), else the tower's."""
        im = cfg.method.image_masking
        return int(cfg.model.image.image_size) * (int(im.target_scale) if im.enabled else 1)

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        m, model = cfg.method, cfg.model
        im, tm = m.image_masking, m.text_masking
        self.image_tower = VisionTower(model.image)
        self.text_tower = TextTower(model.text, self.tokenizer.vocab_size)
        self.weights = {k: float(m.loss_weights[k]) for k in ("itc", "mim", "mlm")}
        self.weights["itc_prompt"] = self.weights["itc"]  # the same contrastive loss, over other captions
        self.itc = bool(m.contrastive)
        self.mim = bool(im.enabled)
        self.mlm = bool(tm.enabled)
        self.paired_prompts = self.itc and bool(m.prompts.paired)
        self.pooled_latent = self.mlm and tm.conditioning == "pooled-latent"
        # the image decoder reads the report as the text masker hides it, so the masker runs even without EntMLM
        self.decoder_reads_masked = self.mim and bool(im.decoder_attends_text) and im.decoder_text == "masked"
        self.masks_text = self.mlm or self.decoder_reads_masked
        self.joint_space = self.has_joint_space(cfg)
        self.scale = int(im.target_scale) if self.mim else 1
        if self.itc:
            add_joint_space(self, cfg)
        if self.mim:  # min_visible against the patches the tower has, known once it is built
            mask_counts(self.image_tower.num_patches, im.mask_ratio, im.attention_share, im.min_visible)
            dec = model.image_decoder
            self.target_patch = self.image_tower.patch_size * self.scale
            self.image_decoder = ImageDecoder(
                self.image_tower.width, self.image_tower.num_patches, self.target_patch ** 2, dec.width,
                dec.layers, dec.heads, self.text_tower.width if im.decoder_attends_text else None)
        if self.mlm:
            width = self.text_tower.width
            if self.pooled_latent:
                self.image_latent = PooledImageLatent(self.image_tower.width, width)
            else:
                dec = model.text_decoder
                self.text_decoder = TextDecoder(width, dec.layers, dec.heads, self.image_tower.width)
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
        if not self.masks_text:
            return CorpusCollate(self.tokenizer)
        return CorpusCollate(self.tokenizer, TextMasker.from_config(self.tokenizer, self.cfg.method.text_masking))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"} if self.itc else set()

    # --- training ------------------------------------------------------------------------------------
    def patch_scores(self, patch_tokens: torch.Tensor, text_tokens: torch.Tensor, text: TextBatch,
                     pooled_text: torch.Tensor) -> torch.Tensor:
        """[B, N] how much each image's patches respond to its text (rows aligned), in the joint space.

        cross-attention: scaled dot products of the projected word-pieces and patches, the softmax over the
        axis `attention_softmax` names (`bench.modeling.masking.attention_scores`). global: the cosine of each
        patch with the text's embedding."""
        im = self.cfg.method.image_masking
        patches = self.image_proj(patch_tokens)
        if im.attention_source == "global":
            text_emb = F.normalize(self.text_proj(pooled_text), dim=-1)
            return torch.einsum("bnd,bd->bn", F.normalize(patches, dim=-1), text_emb)
        return attention_scores(self.text_proj(text_tokens), patches, text.attention_mask, im.attention_softmax)

    def training_step(self, batch: Batch) -> StepOutput:
        im, tm = self.cfg.method.image_masking, self.cfg.method.text_masking
        parts: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        # with target_scale > 1 the corpus hands over larger images (corpus_image_size): the towers see them resized
        images, target_images = tower_and_target(batch.images, self.image_tower.image_size, self.scale)
        pairs = batch.pairs() if images is not None and batch.text is not None else None
        has_pairs = pairs is not None and len(pairs[0]) > 0
        text_out = self.text_tower(batch.text) if self.itc and has_pairs else None
        masked_rows = self._masked_rows(batch, text_out)
        masked_tokens = None
        if masked_rows is not None and not self.pooled_latent:  # pooled-latent conditions on the image: below
            masked_tokens = self.text_tower(_rows(batch.masked_text, masked_rows))[1]
        mlm_sees_full = self.mlm and masked_rows is not None and tm.decoder_image == "full"
        # one pass over the whole image with gradient, unless masking is on and nothing needs the whole image
        full = self.image_tower(images) if images is not None and (
            not self.mim or mlm_sees_full or (text_out is not None and im.contrastive_view == "full")) else None
        visible_pooled = visible = None
        if self.mim and images is not None:
            mask = self._patch_mask(images, batch, pairs if has_pairs else None, text_out, full)
            visible_pooled, visible = self.image_tower(images, keep=mask.keep)
        # the image tokens the text branch consults (decoder_image); check_config refuses visible without masking
        image_tokens = visible if tm.decoder_image == "visible" else full[1] if full is not None else None
        if masked_rows is not None and self.pooled_latent:
            latent = self.image_latent(image_tokens, self._text_image(batch, masked_rows, image_tokens))
            masked_tokens = encode_with_offset(self.text_tower.encoder, _rows(batch.masked_text, masked_rows), latent)
        if self.mim and images is not None:
            context = self._decoder_text(batch, text_out, masked_tokens, masked_rows)
            losses["mim"] = self._mim_loss(batch, target_images, mask, visible, context)
            parts["masked_patches"] = mask.masked.float().mean().detach()
        if text_out is not None:
            scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
            image_rows, text_rows = pairs
            pooled = full[0] if full is not None else visible_pooled
            groups = None if batch.text_groups is None else batch.text_groups[text_rows]
            losses["itc"] = clip_loss(F.normalize(self.image_proj(pooled[image_rows]), dim=-1),
                                      F.normalize(self.text_proj(text_out[0][text_rows]), dim=-1), scale, groups)
            if self.paired_prompts:
                losses.update(self._prompt_itc(batch, pooled, text_out[0], scale))
            parts["logit_scale"] = scale.detach()
        if self.mlm and masked_tokens is not None:
            targets = batch.mlm_labels[masked_rows] != IGNORE
            weight = rank_weight(targets.sum())  # ranks mask different numbers of tokens; weigh to the global mean
            if bool(targets.any()):
                losses["mlm"] = weight * self._mlm_loss(batch, masked_rows, masked_tokens, image_tokens, targets)
            parts["masked_tokens"] = targets.float().sum().detach() / batch.masked_text.attention_mask.sum()
        if not losses:
            raise UserError(f"batch of {len(batch)} samples gave {self.cfg.method.name} nothing to learn from")
        total = sum(self.weights[k] * v for k, v in losses.items())
        return StepOutput(total, {**{k: v.detach() for k, v in losses.items()}, **parts})

    def _masked_rows(self, batch: Batch, text_out) -> torch.Tensor | None:
        """The text rows to encode masked, or None when nothing reads the masked text. Prompts are never
        masked: with the ITC pass's tokens at hand only the reports are encoded again."""
        if not self.masks_text or batch.masked_text is None:
            return None
        if batch.mlm_rows is not None and text_out is not None:
            return batch.mlm_rows
        return torch.arange(len(batch.masked_text), device=batch.masked_text.input_ids.device)

    def _decoder_text(self, batch: Batch, text_out, masked_tokens: torch.Tensor | None,
                      masked_rows: torch.Tensor | None) -> torch.Tensor | None:
        """The text tokens the image decoder reads, one row per text row: the reports as the text masker hid
        them (decoder_text=masked, whether or not EntMLM trains on them) or plain, and the prompts, which are
        never masked; None for a decoder that reads no text, or a batch without text."""
        if self.image_decoder.memory is None or batch.text is None:
            return None
        plain = text_out[1] if text_out is not None else None
        if self.decoder_reads_masked and masked_tokens is not None:
            return masked_tokens if plain is None else plain.index_copy(0, masked_rows, masked_tokens)
        return plain if plain is not None else self.text_tower(batch.text)[1]

    def _prompt_itc(self, batch: Batch, pooled: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """prompts.paired: InfoNCE between paired images and the disease-kind prompts written from their labels,
        extra text rows the corpus adds (`image_prompt`: each image's prompt row, -1 none); equal prompts are
        one caption, as for image-only rows."""
        prompt_of = batch.image_prompt
        if prompt_of is None:
            return {}
        images = (prompt_of >= 0).nonzero().squeeze(1)
        rows = prompt_of[images]
        groups = None if batch.text_groups is None else batch.text_groups[rows]
        return {"itc_prompt": clip_loss(F.normalize(self.image_proj(pooled[images]), dim=-1),
                                        F.normalize(self.text_proj(texts[rows]), dim=-1), scale, groups)}

    def _patch_mask(self, images: torch.Tensor, batch: Batch, pairs: tuple[torch.Tensor, torch.Tensor] | None,
                    text_out, full, generator: torch.Generator | None = None):
        """AttMIM's mask of `images` (the batch's, at the tower's size): images with text are scored against it
        without gradient (from the ITC pass's features, or one no-grad pass over the whole image); images
        without text, and the random strategy, get uniformly random masks. Random draws come from `generator`
        (None: torch's global RNG, as training)."""
        im = self.cfg.method.image_masking
        n_images, n_patches = images.shape[0], self.image_tower.num_patches
        scores = None
        if im.strategy == "attention" and text_out is not None and pairs is not None:
            image_rows, text_rows = pairs
            with torch.no_grad():
                tokens = full[1].detach() if full is not None else self.image_tower(images)[1]
                scores = torch.rand(n_images, n_patches, device=images.device, generator=generator)
                scores[image_rows] = self.patch_scores(
                    tokens[image_rows], text_out[1][text_rows].detach(), _rows(batch.text, text_rows),
                    text_out[0][text_rows].detach()).float()
        return select_patches(scores, n_images, n_patches, im.mask_ratio, im.attention_share, im.min_visible,
                              images.device, generator)

    @torch.no_grad()
    def mask_probe(self, images: torch.Tensor, texts: list[str], generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """[B, N] bool: the patches image masking hides in each image (at the tower's or the corpus's size)
        paired with its text, chosen by the training step's own path (`_patch_mask`: AttMIM scores, then
        `select_patches`; random masks for the random strategy), with random draws from `generator` so that
        measuring never moves training's RNG. The caller sets the mode (eval, for a measurement); AttMIM's hit rate is scored
        on these (`bench.modeling.masking.hit_rate`)."""
        if not self.mim:
            raise UserError(f"method {self.cfg.method.name} has image masking off (method.image_masking.enabled="
                            f"false): there is no mask to measure")
        if images.shape[-1] != self.image_tower.image_size:
            images = tower_and_target(images, self.image_tower.image_size, self.scale)[0]
        text = self.tokenizer(list(texts)).to(images.device)
        rows = torch.arange(len(text), device=images.device)
        attention = self.itc and self.cfg.method.image_masking.strategy == "attention"
        text_out = self.text_tower(text) if attention else None
        return self._patch_mask(images, Batch(images, text), (rows, rows), text_out, None, generator).masked

    def _mim_loss(self, batch: Batch, target_images: torch.Tensor, mask, visible: torch.Tensor,
                  context: torch.Tensor | None) -> torch.Tensor:
        """MSE on the hidden patches' pixels (`masked_patch_loss`), the decoder reading the text `context`."""
        image_text = batch.image_text if batch.image_text is not None else \
            torch.arange(batch.images.shape[0], device=batch.images.device)
        if context is None:
            image_text = torch.full_like(image_text, -1)
        padding = None if context is None else batch.text.attention_mask == 0
        prediction = self.image_decoder(visible, mask.keep, context, padding, image_text)
        return masked_patch_loss(prediction, target_images, self.target_patch, mask.masked,
                                 bool(self.cfg.method.image_masking.norm_pix_loss))

    def _text_image(self, batch: Batch, rows: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """For text `rows`, the image row each one's text branch consults (-1: none)."""
        if batch.images is None or image_tokens is None:
            return torch.full((len(rows),), -1, dtype=torch.long, device=rows.device)
        return batch.text_image()[rows]

    def _mlm_loss(self, batch: Batch, rows: torch.Tensor, masked_tokens: torch.Tensor,
                  image_tokens: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the hidden word-pieces of text `rows`: the text decoder's states, attending to the
        image (text-only rows to its "no image" token), or with pooled-latent the text tower's own, whose
        input already carries the image."""
        if self.pooled_latent:
            hidden = masked_tokens[targets]
        else:
            padding = batch.masked_text.attention_mask[rows] == 0
            image_rows = self._text_image(batch, rows, image_tokens)
            hidden = self.text_decoder(masked_tokens, padding, image_tokens, image_rows)[targets]
        return mlm_cross_entropy(self.mlm_transform(hidden), self.mlm_out, self.mlm_vocabulary,
                                 batch.mlm_labels[rows][targets])


def _rows(text: TextBatch, rows: torch.Tensor) -> TextBatch:
    return TextBatch(text.input_ids[rows], text.attention_mask[rows])
