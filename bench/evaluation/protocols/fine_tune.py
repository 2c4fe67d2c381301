"""Fine-tuning: the image encoder and a linear head trained end to end on the shared trainer (BenchX's
protocol): the encoder at `encoder_lr_multiplier` times the head's learning rate, BCE for binary and
multi-label tasks, cross-entropy for multi-class ones, the validation metric computed after every epoch,
the best epoch's weights kept (checkpoint selection) and training stopped after `patience` epochs without
improvement. Decision thresholds come from the selected weights' validation scores; the test split is read
once, at the end. A killed fine-tuning run resumes from its last epoch (the trainer's checkpoint)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bench.core.errors import UserError
from bench.core.io import atomic_torch_save
from bench.data.corpus import MixedBatchSampler
from bench.data.image_datasets import LabelledImageDataset, collate_labelled
from bench.evaluation.features import image_outputs
from bench.evaluation.metrics import task_metrics
from bench.evaluation.protocols.linear_probe import train_subset
from bench.evaluation.result import ProtocolResult, split_labels, val_thresholds
from bench.modeling.method import StepOutput
from bench.train import distributed
from bench.train.speed import Speed
from bench.train.trainer import CHECKPOINT, Trainer, seed_everything

BEST = "best.pt"


class FineTuneModel(nn.Module):
    """A copy of a model's image encoder (the modules `encode_image` uses; the rest is frozen) and a linear
    head. Speaks the trainer's side of the Method contract: as for a Method, calling it is the training step
    (DDP hooks into `forward`); `logits` and `predict` map images to outputs."""

    def __init__(self, method: nn.Module, n_classes: int, multiclass: bool, encoder_lr_multiplier: float,
                 probe: torch.Tensor):
        super().__init__()
        self.encoder = copy.deepcopy(method)
        trainable = tuple(method.image_modules())
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(name.startswith(trainable))
        self.encoder.eval()
        with torch.no_grad():
            width = self.encoder.encode_image(probe).shape[-1]
        self.head = nn.Linear(width, n_classes)
        self.multiclass, self.multiplier = multiclass, float(encoder_lr_multiplier)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode_image(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images).float()
        return logits.softmax(-1) if self.multiclass else logits.sigmoid()

    def forward(self, batch) -> StepOutput:
        return self.training_step(batch)

    def training_step(self, batch) -> StepOutput:
        logits = self.logits(batch.images).float()
        if self.multiclass:
            loss = F.cross_entropy(logits, batch.labels.argmax(1))
            return StepOutput(loss, {"ce": loss.detach()})
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return StepOutput(loss, {"bce": loss.detach()})

    def no_weight_decay(self) -> set[str]:
        return set()

    def lr_multipliers(self) -> dict[str, float]:
        return {"encoder.": self.multiplier}


class EarlyStopping:
    """After each epoch: the validation metric; the best epoch's weights saved to `best.pt`; `stop` once
    `patience` epochs in a row did not improve on the best (patience null: never stop early). Under torchrun
    every rank scores the model and follows rank 0's score (GPU kernels may differ in the last bit), and
    only rank 0 writes the weights."""

    def __init__(self, score, patience: int | None, best_path: Path):
        self.score, self.patience, self.best_path = score, patience, best_path
        self.stop, self.best, self.best_epoch, self.bad, self.history = False, -math.inf, 0, 0, []

    def __call__(self, model: FineTuneModel, epoch: int) -> None:
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

    def _keep(self, model: nn.Module) -> None:
        if distributed.is_main():
            atomic_torch_save(self.best_path, model.state_dict())

    def state_dict(self) -> dict:
        return {"stop": self.stop, "best": self.best, "best_epoch": self.best_epoch, "bad": self.bad,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.stop, self.best, self.best_epoch = state["stop"], state["best"], state["best_epoch"]
        self.bad, self.history = state["bad"], list(state["history"])


def fine_tune(ctx, fraction: float, seed: int, run_dir: Path) -> ProtocolResult:
    ft, task, data = ctx.cfg.eval.fine_tune, ctx.data.task, ctx.data
    report = ctx.report_split
    parts = {"train": train_subset(ctx, fraction, seed), "val": data.rows("val"), report: data.rows(report)}
    y = split_labels(task, parts, "fine-tune", data.name)
    multiclass = task.kind == "multi-class"
    started = time.perf_counter()
    image = data.image_cfg
    probe = torch.zeros(1, image.get("channels", 3), image.image_size, image.image_size, device=ctx.device)
    seed_everything(seed)  # the head's initialisation
    model = FineTuneModel(ctx.method, len(task.labels), multiclass, ft.encoder_lr_multiplier, probe).to(ctx.device)
    train = LabelledImageDataset(parts["train"]["image_path"], y["train"], parts["train"]["sample_id"],
                                 data.preprocessor(augment=bool(ft.augment)), data.cache, seed)
    # the global batch: each of the torchrun ranks trains on an equal share of it
    world = distributed.world_size()
    if int(ft.batch_size) % world:
        raise UserError(f"eval.fine_tune.batch_size={ft.batch_size} is the global batch; it must be divisible by "
                        f"the {world} processes")
    batch_size = min(int(ft.batch_size), len(train) // world * world)
    sampler = MixedBatchSampler({"train": len(train)}, {"train": batch_size}, seed, "eval.fine_tune.batch_size")
    steps_per_epoch = len(train) // batch_size
    trainer_cfg = OmegaConf.merge(ctx.cfg.trainer, {
        "epochs": int(ft.epochs), "batch_size": batch_size, "lr": float(ft.lr), "weight_decay": float(ft.weight_decay),
        "warmup_steps": int(round(float(ft.warmup_epochs) * steps_per_epoch)), "max_steps": None, "accumulate": 1,
        "precision": ft.precision, "checkpoint_every": 10**9})  # the trainer saves after every epoch anyway

    def val_metric(m: FineTuneModel) -> float:
        scores = image_outputs(m, parts["val"], m.predict, data.preprocessor(augment=False), data.cache,
                               int(ctx.cfg.eval.batch_size), ctx.device, ctx.num_workers)
        return task_metrics(task.kind, y["val"], scores, task.labels)[0][task.metric]

    patience = None if ft.patience is None else int(ft.patience)
    stopper = EarlyStopping(val_metric, patience, run_dir / BEST)
    # no compilation: fine-tuning runs are many and short, and each new model would be compiled again
    speed = replace(Speed.resolve(ctx.cfg.runtime.get("speed"), ctx.device), compile=False)
    Trainer(trainer_cfg, run_dir, ctx.device, progress=False, num_workers=ctx.num_workers, speed=speed).fit(
        model, train, collate_labelled, sampler, seed, validation=stopper)
    stopper.load_state_dict(torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["validation"])
    model.load_state_dict(torch.load(run_dir / BEST, map_location=ctx.device, weights_only=False))
    scores = {s: image_outputs(model, parts[s], model.predict, data.preprocessor(augment=False), data.cache,
                               int(ctx.cfg.eval.batch_size), ctx.device, ctx.num_workers) for s in dict.fromkeys(("val", report))}
    chosen = {"best_epoch": stopper.best_epoch, f"val_{task.metric}": stopper.best,
              f"val_{task.metric}_by_epoch": stopper.history, "epochs_run": len(stopper.history),
              "stopped_early": stopper.stop and len(stopper.history) < int(ft.epochs),
              "n_train": len(train), "batch_size": batch_size}
    return ProtocolResult(task, parts[report], y[report], scores[report],
                          val_thresholds(task, y["val"], scores["val"]), chosen,
                          timing={"fine_tune_s": time.perf_counter() - started})


def remove_weights(run_dir: Path) -> None:
    """Fine-tuned weights are large and the record keeps what they gave; only the logs stay."""
    for name in (CHECKPOINT, BEST, "final.pt"):
        (run_dir / name).unlink(missing_ok=True)

