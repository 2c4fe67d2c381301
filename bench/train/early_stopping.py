"""Checkpoint selection and early stopping on a validation metric, as the trainer's end-of-epoch hook."""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from bench.core.io import atomic_torch_save
from bench.train import distributed


class EarlyStopping:
    """After each epoch: the validation metric; the best epoch's weights saved to `best.pt`; `stop` once
    `patience` epochs in a row did not improve on the best (patience null: never stop early). Under torchrun
    every rank scores the model and follows rank 0's score (GPU kernels may differ in the last bit), and
    only rank 0 writes the weights. Each epoch's score goes to the run's curves as `val/<metric>`."""

    def __init__(self, score, patience: int | None, best_path: Path, metric: str = "score"):
        self.score, self.patience, self.best_path, self.metric = score, patience, best_path, metric
        self.stop, self.best, self.best_epoch, self.bad, self.history = False, -math.inf, 0, 0, []

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        value = distributed.agree(float(self.score(model)))
        self.history.append(round(value, 6))
        if not math.isnan(value) and value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch + 1, 0
            self._keep(model)
        elif self.best_epoch == 0:  # a metric undefined from the start: keep the first epoch's weights
            self.best_epoch = epoch + 1
            self._keep(model)
        else:
            self.bad += 1
        self.stop = self.patience is not None and self.bad >= self.patience
        return {f"val/{self.metric}": value}

    def _keep(self, model: nn.Module) -> None:
        if distributed.is_main():
            atomic_torch_save(self.best_path, model.state_dict())

    def state_dict(self) -> dict:
        return {"stop": self.stop, "best": self.best, "best_epoch": self.best_epoch, "bad": self.bad,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.stop, self.best, self.best_epoch = state["stop"], state["best"], state["best_epoch"]
        self.bad, self.history = state["bad"], list(state["history"])
