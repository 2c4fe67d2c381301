"""Evaluation protocols. Each takes an evaluation context (the model, one loaded dataset, the config, the
device and the model's feature cache) and returns a ProtocolResult computed on the dataset's test split,
with anything it fits fitted on train and anything it chooses chosen on val.

A sweep sets `report_split` to `val`: the protocol then reports on the split it chooses on (the best
validation value over its choices, the usual tuning objective) and never touches test."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from bench.evaluation.features import FeatureCache
from bench.evaluation.fine_tune import fine_tune
from bench.evaluation.linear_probe import linear_probe
from bench.evaluation.result import ProtocolResult
from bench.evaluation.zero_shot import zero_shot

PROTOCOLS = ("zero-shot", "linear-probe", "fine-tune")
FROZEN = ("zero-shot", "linear-probe")  # read features from the cache; fine-tuning trains the encoder


@dataclass
class EvalContext:
    method: torch.nn.Module
    data: object  # bench.pipeline.LoadedDataset
    cfg: DictConfig
    device: torch.device
    features: FeatureCache
    num_workers: int = 0
    report_split: str = "test"


__all__ = ["PROTOCOLS", "FROZEN", "EvalContext", "FeatureCache", "ProtocolResult", "fine_tune", "linear_probe",
           "zero_shot"]
