"""Evaluation protocols. Each takes an evaluation context (the model, one loaded dataset, the config, the
device and the model's feature cache) and returns a ProtocolResult computed on the dataset's test split,
with anything it fits fitted on train and anything it chooses chosen on val.

A sweep sets `report_split` to `val`: the protocol then reports on the split it chooses on (the best
validation value over its choices, the usual tuning objective) and never touches test.

The protocol modules import torch and scikit-learn; they load on first use, so that naming the protocols
(`bench list`, config validation) stays instant."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from bench.evaluation.features import FeatureCache
    from bench.evaluation.result import ProtocolResult

PROTOCOLS = ("zero-shot", "linear-probe", "fine-tune")
FROZEN = ("zero-shot", "linear-probe")  # read features from the cache; fine-tuning trains the encoder
FITS_LABELS = ("linear-probe", "fine-tune")  # one record per label fraction x evaluation seed

# the protocol functions share their modules' names (bench.evaluation.protocols.zero_shot.zero_shot): import them from there
_LAZY = {"FeatureCache": "bench.evaluation.features", "ProtocolResult": "bench.evaluation.result"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class EvalContext:
    method: torch.nn.Module
    data: object  # bench.experiment.chain.LoadedDataset
    cfg: DictConfig
    device: torch.device
    features: FeatureCache
    num_workers: int = 0
    report_split: str = "test"


def run_protocol(ctx: EvalContext, protocol: str, fraction: float, seed: int, fine_tune_dir: Path
                 ) -> ProtocolResult:
    """One evaluation of `ctx.method`, in eval mode whatever mode it came in (and is left in): what a protocol
    computes must not depend on whether its features were cached, which is where eval mode used to be set."""
    from bench.evaluation.protocols.fine_tune import fine_tune
    from bench.evaluation.protocols.linear_probe import linear_probe
    from bench.evaluation.protocols.zero_shot import zero_shot

    was_training = ctx.method.training
    ctx.method.eval()
    try:
        if protocol == "zero-shot":
            return zero_shot(ctx)
        if protocol == "linear-probe":
            return linear_probe(ctx, fraction, seed)
        return fine_tune(ctx, fraction, seed, fine_tune_dir)
    finally:
        ctx.method.train(was_training)


__all__ = ["PROTOCOLS", "FROZEN", "FITS_LABELS", "EvalContext", "run_protocol", *_LAZY]
