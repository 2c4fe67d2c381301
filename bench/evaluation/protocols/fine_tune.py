"""Fine-tuning: the image encoder and a linear head trained end to end on the shared trainer (BenchX's
protocol): the encoder at `encoder_lr_multiplier` times the head's learning rate, BCE for binary and
multi-label tasks, cross-entropy for multi-class ones, the validation metric computed after every epoch,
the best epoch's weights kept (checkpoint selection) and training stopped after `patience` epochs without
improvement. Decision thresholds come from the selected weights' validation scores; the test split is read
once, at the end. A killed fine-tuning run resumes from its last epoch (the trainer's checkpoint)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from bench.core.checks import integer, list_of, number, one_of
from bench.core.errors import UserError
from bench.core.registry import register_protocol
from bench.evaluation.protocol import EvalContext, Protocol

if TYPE_CHECKING:
    from bench.evaluation.result import ProtocolResult
    from bench.modeling.fine_tune_model import FineTuneModel

BEST = "best.pt"


def label_fractions(key: str, v: Any) -> str | None:
    """null (eval.fractions) or distinct label fractions in (0, 1]."""
    return None if v is None else list_of(number(0, 1, low_open=True), nonempty=True, distinct=True)(key, v)


@register_protocol("fine-tune")
class FineTune(Protocol):
    order = 2
    fits_labels = True
    defaults = {
        # the label fractions it runs at (null: eval.fractions). The default demo fine-tunes at 10% only: at 100%
        # fine-tuning both models would take the main job past 6 minutes on 2 CPU cores. For the field's grid:
        # eval.fine_tune.fractions=null (with eval.fractions=[0.01,0.1,1.0])
        "fractions": [0.1],
        "epochs": 3,  # CPU-friendly for the synthetic benchmark; real studies use more (BenchX: up to 50)
        "batch_size": 32,
        "lr": 1.0e-3,  # the head's; the encoder trains at lr x encoder_lr_multiplier
        "encoder_lr_multiplier": 0.1,  # BenchX's lr_multiplier_ve
        "weight_decay": 0.01,
        "warmup_epochs": 1,
        "patience": 2,  # epochs without a better val metric before stopping; null = run every epoch
        "augment": True,
        "precision": "auto",  # auto: bf16 autocast on CUDA
        "keep_weights": False,  # the fine-tuned weights are deleted once the record is written
    }
    setting_checks = {"fractions": label_fractions, "epochs": integer(1), "batch_size": integer(1),
                      "lr": number(0, low_open=True), "encoder_lr_multiplier": number(0), "weight_decay": number(0),
                      "warmup_epochs": number(0), "patience": integer(1, null=True),
                      "precision": one_of(("auto", "bf16", "fp32"))}

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> ProtocolResult:
        return fine_tune(ctx, fraction, seed, folder)

    @classmethod
    def remove_outputs(cls, cfg: DictConfig, folder: Path) -> None:
        if not cfg.eval.fine_tune.keep_weights:
            remove_weights(folder)


def fine_tune(ctx: EvalContext, fraction: float, seed: int, run_dir: Path) -> ProtocolResult:
    import torch

    from bench.data.corpus import MixedBatchSampler
    from bench.data.image_datasets import LabelledImageDataset, collate_labelled
    from bench.evaluation.features import image_outputs
    from bench.evaluation.metrics import task_metrics
    from bench.evaluation.result import ProtocolResult, split_labels, val_thresholds
    from bench.modeling.fine_tune_model import FineTuneModel
    from bench.train import distributed
    from bench.train.early_stopping import EarlyStopping
    from bench.train.speed import Speed
    from bench.train.trainer import CHECKPOINT, Trainer, seed_everything

    ft, task, data = ctx.cfg.eval.fine_tune, ctx.data.task, ctx.data
    report = ctx.report_split
    parts = {"train": ctx.train_rows(fraction, seed), "val": data.rows("val"), report: data.rows(report)}
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
        "budget": {"epochs": int(ft.epochs), "steps": None}, "batch_size": batch_size, "lr": float(ft.lr),
        "weight_decay": float(ft.weight_decay), "warmup_steps": int(round(float(ft.warmup_epochs) * steps_per_epoch)),
        "accumulate": 1,
        "precision": ft.precision, "checkpoint_every": 10**9})  # the trainer saves after every epoch anyway

    def val_metric(m: FineTuneModel) -> float:
        scores = image_outputs(m, parts["val"], m.predict, data.preprocessor(augment=False), data.cache,
                               int(ctx.cfg.eval.batch_size), ctx.device, ctx.num_workers)
        return task_metrics(task.kind, y["val"], scores, task.labels)[0][task.metric]

    patience = None if ft.patience is None else int(ft.patience)
    stopper = EarlyStopping(val_metric, patience, run_dir / BEST, metric=task.metric)
    # no compilation: fine-tuning runs are many and short, and each new model would be compiled again
    speed = replace(Speed.resolve(ctx.cfg.runtime.get("speed"), ctx.device), compile=False)
    # the curves go to run_dir with its metrics.jsonl: remove_outputs deletes only the weights there, so both
    # outlive the record (results/finetune/<method>/<record>/tensorboard)
    trainer = Trainer(trainer_cfg, run_dir, ctx.device, progress=False, num_workers=ctx.num_workers, speed=speed,
                      flops=False,  # a record's cost is its pretraining's
                      loggers=ctx.cfg.runtime.get("loggers", []))
    trainer.fit(model, train, collate_labelled, sampler, seed, validation=stopper)
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
    from bench.train.trainer import CHECKPOINT

    for name in (CHECKPOINT, BEST, "final.pt"):
        (run_dir / name).unlink(missing_ok=True)

