"""MLIP: masked contrastive learning with semantic integrity estimation, patch-sentence matching and masked image
prediction (Liu, Zhou, Li, Huang, Yang, Liang, Wang, arXiv 2401.01591, ISBI 2024).

What the abstract fixes: image-text pairs with many-to-many local relations, modelled by **patch-sentence
matching**; a **masked contrastive learning** strategy with **semantic integrity estimation** that removes
image redundancy while keeping the semantics. What secondary summaries add, unconfirmed: optimal-transport
sentence-patch matching, a semantic-aware weighting from the integrity estimate, masked image prediction.
No code was released: everything below is our proposal, each choice a switch in configs/method/mlip.yaml,
recorded with every result. Ours are: random masks and their ratio; the integrity estimator (the cosine of
the masked view's embedding with the whole image's, from one pass without gradient) and how it enters the loss
(a per-pair weight or a softened target) with its floor; the rule sentence splitter and the sentence cap;
whether matching has projections of its own; uniform marginals, entropic Sinkhorn with cost 1 - cosine, its
epsilon, iterations and whether gradients flow through the plan; the plan-weighted cosine as the local
similarity and its fixed temperature; the MAE decoder (model.image_decoder) and its normalised-pixel target;
the loss weights; paired data only.

One step over a batch of paired rows:
1. Masking: each image hides `mask_ratio` of its patches at random; the encoder sees only the visible ones.
2. Global ITC: symmetric InfoNCE between the visible patches' pooled embedding and the report's, over the global
   batch; with integrity on, each pair's terms are weighed (or its target softened) by how close the masked
   view's embedding is to the whole image's (no gradient through the estimate).
3. Patch-sentence matching: the visible patches and the report's sentences, each projected and normalised;
   for every image and report of the batch a transport plan (bench/modeling/transport.py) between them; the
   plan-weighted cosine is a local similarity, contrasted across the batch in both directions.
4. Masked image prediction: an MAE decoder predicts the hidden patches' pixels from the visible tokens.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bench.core.checks import Check, integer, number, one_of
from bench.core.errors import UserError
from bench.core.registry import register_method
from bench.data.batch import Batch, TextBatch
from bench.data.corpus import CorpusCollate, Sentences
from bench.methods.clip import JOINT_SPACE_CHECKS, JointSpaceEncoders, add_joint_space
from bench.modeling.decoders import ImageDecoder, masked_patch_loss
from bench.modeling.losses import gather_ids, gather_with_grad, integrity_contrastive_loss
from bench.modeling.masking import mask_counts, select_patches
from bench.modeling.method import Method, StepOutput
from bench.modeling.towers import TextTower, VisionTower
from bench.modeling.transport import local_similarity

INTEGRITY_USES = ("weight", "soften")


@register_method("mlip")
class MLIP(JointSpaceEncoders, Method):
    # the towers, then the joint space (temperature), are built first; every other switch builds modules after them
    init_settings = ("temperature",)
    setting_checks: ClassVar[dict[str, Check]] = {
        **JOINT_SPACE_CHECKS,
        **{f"loss_weights.{k}": number(0) for k in ("itc", "psm", "mim")},
        "masking.mask_ratio": number(0, 1, high_open=True),
        "masking.min_visible": integer(1),
        "integrity.source": one_of(("full-view",)),
        "integrity.use": one_of(INTEGRITY_USES),
        "integrity.floor": number(0, 1, low_open=True),
        "psm.max_sentences": integer(1),
        "psm.sentence_length": integer(4),
        "psm.projection": one_of(("separate", "shared")),
        "psm.epsilon": number(0, low_open=True),
        "psm.iterations": integer(1),
        "psm.temperature": number(0, low_open=True),
    }

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        for branch, missing in (("integrity", "no masked view to estimate"), ("mim", "nothing hidden to predict")):
            if m[branch].enabled and not m.masking.enabled:
                raise UserError(f"method.{branch}.enabled=true needs method.masking.enabled=true: with every patch "
                                f"visible there is {missing}")
        if m.unpaired or m.prompts.enabled:
            raise UserError("mlip trains on paired image-report data only: set method.unpaired=false and "
                            "method.prompts.enabled=false")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        m, model = cfg.method, cfg.model
        self.image_tower = VisionTower(model.image)
        self.text_tower = TextTower(model.text, self.tokenizer.vocab_size)
        add_joint_space(self, cfg)
        self.weights = {k: float(m.loss_weights[k]) for k in ("itc", "psm", "mim")}
        self.masking, self.integrity = bool(m.masking.enabled), bool(m.integrity.enabled)
        self.psm, self.mim = bool(m.psm.enabled), bool(m.mim.enabled)
        if self.masking:  # min_visible against the patches the tower has
            hidden, _ = mask_counts(self.image_tower.num_patches, m.masking.mask_ratio, 0.0, m.masking.min_visible)
            if hidden == 0 and (self.mim or self.integrity):
                raise UserError(f"method.masking.mask_ratio={m.masking.mask_ratio} hides no patch of "
                                f"{self.image_tower.num_patches}: masked image prediction and integrity estimation "
                                f"need some hidden; raise it or set method.masking.enabled=false")
        if self.psm and m.psm.projection == "separate":
            self.patch_proj = nn.Linear(self.image_tower.width, model.embed_dim, bias=False)
            self.sentence_proj = nn.Linear(self.text_tower.width, model.embed_dim, bias=False)
        if self.mim:
            dec = model.image_decoder
            self.image_decoder = ImageDecoder(self.image_tower.width, self.image_tower.num_patches,
                                              self.image_tower.patch_size ** 2, dec.width, dec.layers, dec.heads)
        if m.freeze_text:
            self.text_tower.requires_grad_(False)

    def make_collate(self) -> CorpusCollate:
        if not self.psm:
            return CorpusCollate(self.tokenizer)
        p = self.cfg.method.psm
        return CorpusCollate(self.tokenizer, sentences=Sentences(
            self.tokenizer.with_max_length(int(p.sentence_length)), int(p.max_sentences)))

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    # --- training ------------------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> StepOutput:
        m = self.cfg.method
        if batch.images is None or batch.text is None:
            raise UserError(f"batch of {len(batch)} samples has no image-report pairs for mlip")
        image_rows, text_rows = batch.pairs()
        if len(image_rows) < len(batch):
            raise UserError("mlip trains on image-report pairs only; the batch holds unpaired rows "
                            "(data.corpus image-only or text-only sources)")
        images = batch.images[image_rows]
        parts: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        mask = None
        if self.masking:
            mask = select_patches(None, images.shape[0], self.image_tower.num_patches, m.masking.mask_ratio, 0.0,
                                  m.masking.min_visible, images.device)
            pooled, tokens = self.image_tower(images, keep=mask.keep)
            parts["masked_patches"] = mask.masked.float().mean().detach()
        else:
            pooled, tokens = self.image_tower(images)
        image_emb = self.project_image(pooled)
        text_emb = self.embed_text(TextBatch(batch.text.input_ids[text_rows], batch.text.attention_mask[text_rows]))
        integrity = self._integrity(images, image_emb) if self.integrity else None
        if integrity is not None:
            parts["integrity"] = integrity.mean()
        scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
        all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)
        losses["itc"] = integrity_contrastive_loss(scale * image_emb @ all_texts.T, scale * text_emb @ all_images.T,
                                                   integrity, m.integrity.use)
        parts["logit_scale"] = scale.detach()
        if self.psm:
            losses["psm"] = self._psm_loss(batch, tokens, text_rows)
        if self.mim:
            prediction = self.image_decoder(tokens, mask.keep)
            losses["mim"] = masked_patch_loss(prediction, images, self.image_tower.patch_size, mask.masked,
                                              bool(m.mim.norm_pix_loss))
        total = sum(self.weights[k] * v for k, v in losses.items())
        return StepOutput(total, {**{k: v.detach() for k, v in losses.items()}, **parts})

    @torch.no_grad()
    def _integrity(self, images: torch.Tensor, masked_emb: torch.Tensor) -> torch.Tensor:
        """[B] semantic integrity of each masked view: the cosine of its joint embedding with the whole image's
        (one pass without gradient), clamped to [floor, 1]."""
        whole = self.embed_image(images)
        return (masked_emb.detach() * whole).sum(-1).clamp(float(self.cfg.method.integrity.floor), 1.0)

    def sentence_embeddings(self, batch: Batch, text_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, max_sentences, d] the L2-normalised sentence embeddings of text `rows`' reports, zero where a
        slot is empty; [R, max_sentences] which slots hold a sentence)."""
        if batch.sentences is None or batch.sentence_index is None:
            raise UserError("mlip's patch-sentence matching needs the reports' sentences; the batch was not made "
                            "by the method's own collate (make_collate)")
        index = batch.sentence_index[text_rows]
        present = index >= 0
        proj = self.sentence_proj if self.cfg.method.psm.projection == "separate" else self.text_proj
        pooled = self.text_tower(batch.sentences)[0] if len(batch.sentences) else None
        padded = torch.zeros(*index.shape, proj.out_features, device=index.device,
                             dtype=pooled.dtype if pooled is not None else torch.float32)
        if pooled is not None:
            padded[present] = F.normalize(proj(pooled), dim=-1)[index[present]]
        return padded, present

    def patch_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n, d] the L2-normalised local embeddings of patch tokens."""
        proj = self.patch_proj if self.cfg.method.psm.projection == "separate" else self.image_proj
        return F.normalize(proj(tokens), dim=-1)

    def _psm_loss(self, batch: Batch, tokens: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        """Local contrastive loss: this rank's images against every rank's reports by their plan-weighted
        patch-sentence similarity, and this rank's reports against every rank's images."""
        p = self.cfg.method.psm
        patches = self.patch_embeddings(tokens)
        sentences, present = self.sentence_embeddings(batch, text_rows)
        match = {"eps": float(p.epsilon), "iterations": int(p.iterations), "plan_grad": bool(p.plan_grad)}
        all_sentences, all_present = gather_with_grad(sentences), gather_ids(present.long()).bool()
        image_to_text = local_similarity(patches, all_sentences, all_present, **match)[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            text_to_image = local_similarity(gather_with_grad(patches), sentences, present, **match)[0].T
        else:  # one process: the same matrix, transposed
            text_to_image = image_to_text.T
        scale = 1.0 / float(p.temperature)
        return integrity_contrastive_loss(scale * image_to_text, scale * text_to_image)
