"""MRM, masked record modelling (Zhou et al., ICLR 2023), as a baseline on MMCLIP's towers and trainer: random
image masking reconstructed by an image decoder that reads no text; random report masking whose MLM is
conditioned on the pooled latent of the masked image (added to the report's token embeddings); no contrastive
loss, paired data only; MRM's 2x super-resolution target is `image_masking.target_scale`
(configs/method/mrm.yaml). Every difference from MMCLIP is a switch of the shared class."""
from __future__ import annotations

from bench.core.registry import register_method
from bench.methods.mmclip import MMCLIP


@register_method("mrm")
class MRM(MMCLIP):
    pass
