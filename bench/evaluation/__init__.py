"""Evaluation protocols: each takes a method, a dataset manifest and its task, and returns metrics,
per-class metrics and per-sample predictions computed on the test split."""
from __future__ import annotations

from bench.evaluation.linear_probe import linear_probe
from bench.evaluation.zero_shot import zero_shot

PROTOCOLS = {"zero-shot": zero_shot, "linear-probe": linear_probe}
