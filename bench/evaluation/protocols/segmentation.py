"""Segmentation of findings on datasets whose adapters provide masks (SIIM-ACR's RLE masks, the union of an
image's components; RSNA's boxes filled as rectangles; their synthetic copies draw the masks the images show).

Default (MGCA's ViT protocol, lighter): the pretrained image encoder frozen, a SETR-style progressive
upsampling decoder over its patch tokens (`bench.modeling.segmentation_model`), BCE + soft Dice per image,
AdamW on the shared trainer; `encoder: fine-tune` trains the encoder's image modules too, at
`encoder_lr_multiplier` times the decoder's rate. Training images are the label fraction's frozen id list (the
same as the linear probe's), with their masks at the model's input geometry (`input_mask`); the epoch with the
best validation score is kept (`select_on`: by default the pooled Dice, the Dice of all validation pixels
at once, where an empty prediction scores 0 and an everywhere one near 0; early stopping after `patience` epochs
without a better one); a frozen encoder's validation tokens are computed once; the test split is read once.

Metrics over the whole test split, per image then averaged (never per batch, never with the background class):
`dice` (foreground Dice at `threshold`; an image with an empty mask scores 1 when the prediction is empty too,
else 0), `dice_pos` (the same over the images whose mask is not empty) and `iou`. Bootstrap CIs resample test
images. The stored predictions hold every test image's true and predicted mask as run-length codes (SIIM's
format, at the input size), from which every number recomputes, and the image path for plots.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from bench.core.checks import integer, number, one_of
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_protocol
from bench.evaluation.protocol import EvalContext, Protocol, dataset_list
from bench.evaluation.protocols.fine_tune import BEST, label_fractions, remove_weights

np = lazy_module("numpy")
pd = lazy_module("pandas")

if TYPE_CHECKING:
    from bench.evaluation.result import SampleMeanResult

METRICS = ("dice", "dice_pos", "iou")
# (dataset, root, input size) -> {sample id: the packed input-size mask, or None without ground truth}
_MASKS: dict[tuple[str, str, int], dict[str, np.ndarray | None]] = {}


@register_protocol("segmentation")
class Segmentation(Protocol):
    order = 3
    fits_labels = True
    requires = frozenset({"masks"})
    defaults = {
        "datasets": None,  # where it runs (null: eval.datasets), of those with masks (SIIM, RSNA)
        "fractions": None,  # the label fractions it runs at (null: eval.fractions)
        "encoder": "frozen",  # frozen | fine-tune
        "decoder_width": 64,  # channels of the decoder's first stage (halved each stage)
        "epochs": 30,
        "batch_size": 16,
        "lr": 5.0e-4,  # the decoder's (MGCA); the encoder trains at lr x encoder_lr_multiplier with fine-tune
        "encoder_lr_multiplier": 0.1,
        "weight_decay": 0.05,
        "warmup_epochs": 0,
        "patience": 5,  # epochs without a better validation score before stopping; null = run every epoch
        # the validation score that picks the epoch: pooled (the Dice of every validation pixel at once: predicting
        # nothing scores 0, predicting everywhere near 0) | balanced (the mean of the Dice over images with a finding
        # and over images without; an empty prediction scores 0.5 there, so a weak decoder's best epoch is often
        # the one that predicts nothing) | dice (the headline, which rewards empty predictions where negatives
        # dominate) | dice_pos (rewards predicting everywhere)
        "dice_weight": 1.0,  # loss = BCE + dice_weight x (1 - soft Dice)
        "select_on": "pooled",
        "threshold": 0.5,  # on the predicted probability
        "precision": "auto",
        "keep_weights": False,
    }
    setting_checks = {"datasets": dataset_list, "fractions": label_fractions,
                      "encoder": one_of(("frozen", "fine-tune")), "decoder_width": integer(1), "epochs": integer(1), "batch_size": integer(1),
                      "lr": number(0, low_open=True), "encoder_lr_multiplier": number(0), "weight_decay": number(0),
                      "warmup_epochs": number(0), "patience": integer(1, null=True), "dice_weight": number(0),
                      "threshold": number(0, 1, low_open=True, high_open=True),
                      "select_on": one_of(("pooled", "balanced", "dice", "dice_pos")),
                      "precision": one_of(("auto", "bf16", "fp32"))}

    @classmethod
    def is_metric(cls, name: str) -> bool:
        return name in METRICS

    @classmethod
    def headline_metrics(cls, present: Sequence[str]) -> list[str]:
        return [m for m in ("dice",) if m in present]

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> SampleMeanResult:
        return segment(ctx, fraction, seed, folder)

    @classmethod
    def remove_outputs(cls, cfg: DictConfig, folder: Path) -> None:
        if not cfg.eval.segmentation.keep_weights:
            remove_weights(folder)


# frozen patch tokens of the validation split are kept in memory up to this size, else re-encoded each epoch
TOKEN_CACHE_BYTES = 1 << 30


def cached_tokens_too_large(rows: pd.DataFrame, model) -> bool:
    return len(rows) * model.grid ** 2 * model.encoder.image_tower.width * 4 > TOKEN_CACHE_BYTES


def masks_of(ctx: EvalContext, rows: pd.DataFrame) -> np.ndarray:
    """[rows, size, size] bool: each row's finding mask at the model's input geometry (computed once per image
    and kept for the process); a row without ground truth is an error naming it."""
    from bench.core.registry import DATASETS
    from bench.data.finding_masks import input_mask
    from bench.data.loading import dataset_root, dataset_settings

    size = int(ctx.data.image_cfg.image_size)
    root = dataset_root(ctx.cfg, ctx.data.name)
    known = _MASKS.setdefault((ctx.data.name, str(root), size), {})
    missing = [i for i, sid in enumerate(rows["sample_id"]) if str(sid) not in known]
    if missing:
        adapter = DATASETS.get(ctx.data.name)(root, dataset_settings(ctx.cfg, ctx.data.name))
        for i in missing:
            row = rows.iloc[i]
            mask = adapter.finding_mask(row)
            known[str(row["sample_id"])] = None if mask is None else np.packbits(input_mask(mask, size))
    out = np.zeros((len(rows), size, size), dtype=bool)
    for i, sid in enumerate(rows["sample_id"]):
        packed = known[str(sid)]
        if packed is None:
            raise UserError(f"segmentation: {ctx.data.name} has no mask for sample {sid} "
                            f"({rows.iloc[i]['image_path']})")
        out[i] = np.unpackbits(packed, count=size * size).reshape(size, size).astype(bool)
    return out


def mask_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Per image ([n, H, W] bool each): `dice` and `iou` (1 when both masks are empty), and `dice_pos` (NaN for
    an image whose true mask is empty)."""
    t = truth.reshape(len(truth), -1)
    p = predicted.reshape(len(predicted), -1)
    inter = (t & p).sum(1).astype(float)
    sizes = t.sum(1) + p.sum(1)
    union = (t | p).sum(1)
    empty = sizes == 0
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(sizes, 1))
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    return {"dice": dice, "dice_pos": np.where(t.any(1), dice, np.nan), "iou": iou}


def selection_score(truth: np.ndarray, predicted: np.ndarray, rule: str) -> float:
    """The validation score of `rule` (eval.segmentation.select_on) of [n, H, W] bool masks; NaN where undefined."""
    if rule == "pooled":
        sizes = int(truth.sum()) + int(predicted.sum())
        return 2.0 * int((truth & predicted).sum()) / sizes if sizes else float("nan")
    scores = mask_scores(truth, predicted)
    dice, positive = scores["dice"], np.isfinite(scores["dice_pos"])
    if rule == "dice":
        return float(dice.mean())
    if rule == "dice_pos":
        return float(dice[positive].mean()) if positive.any() else float("nan")
    parts = [dice[positive].mean() if positive.any() else np.nan,
             dice[~positive].mean() if (~positive).any() else np.nan]
    return float(np.nanmean(parts)) if np.isfinite(parts).any() else float("nan")


def scores_from_predictions(frame: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    """The per-image metrics of stored predictions (their run-length codes), as the record computed them."""
    from bench.data.rle import rle_decode

    truth = np.stack([rle_decode(c, size, size) for c in frame["true_rle"]])
    predicted = np.stack([rle_decode(c, size, size) for c in frame["pred_rle"]])
    return mask_scores(truth, predicted)


def segment(ctx: EvalContext, fraction: float, seed: int, run_dir: Path) -> SampleMeanResult:
    import torch

    from bench.data.corpus import MixedBatchSampler
    from bench.data.image_datasets import MaskedImageDataset, collate_labelled
    from bench.data.rle import rle_encode
    from bench.evaluation.features import image_outputs
    from bench.evaluation.result import SampleMeanResult
    from bench.modeling.segmentation_model import SegmentationModel
    from bench.train import distributed
    from bench.train.early_stopping import EarlyStopping
    from bench.train.speed import Speed
    from bench.train.trainer import CHECKPOINT, Trainer, seed_everything

    sg, data, report = ctx.cfg.eval.segmentation, ctx.data, ctx.report_split
    parts = {"train": ctx.train_rows(fraction, seed), "val": data.rows("val"), report: data.rows(report)}
    for split, rows in parts.items():
        if rows.empty:
            raise UserError(f"segmentation: the {split} split of {data.name} is empty")
    masks = {split: masks_of(ctx, rows) for split, rows in parts.items()}
    started = time.perf_counter()
    seed_everything(seed)  # the decoder's initialisation
    model = SegmentationModel(ctx.method, int(sg.decoder_width), sg.encoder == "fine-tune",
                              float(sg.encoder_lr_multiplier), float(sg.dice_weight)).to(ctx.device)
    if distributed.world_size() > 1:  # the decoder's batch norm over the global batch, as in one process
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train = MaskedImageDataset(parts["train"]["image_path"], masks["train"], parts["train"]["sample_id"],
                               data.preprocessor(augment=False), data.cache, seed)
    world = distributed.world_size()
    if int(sg.batch_size) % world:
        raise UserError(f"eval.segmentation.batch_size={sg.batch_size} is the global batch; it must be divisible "
                        f"by the {world} processes")
    batch_size = min(int(sg.batch_size), len(train) // world * world)
    if batch_size < 1:
        raise UserError(f"segmentation: {data.name}'s {fraction:g} train fraction has {len(train)} images, fewer "
                        f"than the {world} processes")
    sampler = MixedBatchSampler({"train": len(train)}, {"train": batch_size}, seed, "eval.segmentation.batch_size")
    steps_per_epoch = len(train) // batch_size
    trainer_cfg = OmegaConf.merge(ctx.cfg.trainer, {
        "budget": {"epochs": int(sg.epochs), "steps": None}, "batch_size": batch_size, "lr": float(sg.lr),
        "weight_decay": float(sg.weight_decay), "warmup_steps": round(float(sg.warmup_epochs) * steps_per_epoch),
        "accumulate": 1, "precision": sg.precision, "checkpoint_every": 10**9})
    threshold = float(sg.threshold)

    batch = int(ctx.cfg.eval.batch_size)
    # a frozen encoder's patch tokens are the same every epoch: the validation images are encoded once
    frozen_tokens = {}
    if sg.encoder == "frozen" and not cached_tokens_too_large(parts["val"], model):
        frozen_tokens["val"] = torch.from_numpy(image_outputs(
            model.encoder, parts["val"], model.encoder.encode_patches, data.preprocessor(augment=False), data.cache,
            batch, ctx.device, ctx.num_workers))

    def predicted(m: SegmentationModel, split: str) -> np.ndarray:
        if split in frozen_tokens:
            m.eval()
            with torch.no_grad():
                return np.concatenate([(m.decode(t.to(ctx.device)).float().sigmoid() >= threshold).cpu().numpy()
                                       for t in frozen_tokens[split].split(batch)])
        return image_outputs(m, parts[split], lambda x: m.predict(x) >= threshold, data.preprocessor(augment=False),
                             data.cache, batch, ctx.device, ctx.num_workers) > 0.5

    def val_score(m: SegmentationModel) -> float:
        return selection_score(masks["val"], predicted(m, "val"), str(sg.select_on))

    patience = None if sg.patience is None else int(sg.patience)
    # the record's val_score, named after its rule: val/score_pooled, val/score_dice, ...
    stopper = EarlyStopping(val_score, patience, run_dir / BEST, metric=f"score_{sg.select_on}")
    speed = replace(Speed.resolve(ctx.cfg.runtime.get("speed"), ctx.device), compile=False)
    # curves beside metrics.jsonl in run_dir, which outlive the record (remove_outputs deletes only the weights)
    trainer = Trainer(trainer_cfg, run_dir, ctx.device, progress=False, num_workers=ctx.num_workers, speed=speed,
                      flops=False, loggers=ctx.cfg.runtime.get("loggers", []))
    trainer.fit(model, train, collate_labelled, sampler, seed, validation=stopper)
    stopper.load_state_dict(torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["validation"])
    model.load_state_dict(torch.load(run_dir / BEST, map_location=ctx.device, weights_only=False))
    test_pred = predicted(model, report)
    truth = masks[report]
    rows = parts[report]
    frame = pd.DataFrame({"sample_id": rows["sample_id"].astype(str).values,
                          "image_path": rows["image_path"].astype(str).values,
                          "true_pixels": truth.reshape(len(truth), -1).sum(1),
                          "pred_pixels": test_pred.reshape(len(test_pred), -1).sum(1),
                          "true_rle": [rle_encode(m) for m in truth], "pred_rle": [rle_encode(m) for m in test_pred]})
    chosen = {"best_epoch": stopper.best_epoch, "select_on": str(sg.select_on), "val_score": stopper.best,
              "val_score_by_epoch": stopper.history,
              "epochs_run": len(stopper.history), "n_train": len(train), "batch_size": batch_size,
              "encoder": str(sg.encoder), "threshold": threshold, "mask_size": int(truth.shape[-1])}
    extra = {"positives": {"test": int(truth.reshape(len(truth), -1).any(1).sum()),
                           "train": int(masks["train"].reshape(len(train), -1).any(1).sum())}}
    return SampleMeanResult(mask_scores(truth, test_pred), list(frame["sample_id"]), frame, len(frame), chosen, extra,
                            timing={"fine_tune_s": time.perf_counter() - started})
