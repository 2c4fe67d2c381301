"""MRM-style masked record modelling (Zhou et al., ICLR 2023) as a baseline: MMCLIP's model and branches with
random image and report masks, no contrastive loss and paired data only (configs/method/mrm.yaml)."""
from __future__ import annotations

from bench.core.registry import register_method
from bench.methods.mmclip import MMCLIP


@register_method("mrm")
class MRM(MMCLIP):
    pass
