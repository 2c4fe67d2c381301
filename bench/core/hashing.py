"""Plain data and stable hashes: what identifies an experiment, a dataset or a model in the results store."""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def stable_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
