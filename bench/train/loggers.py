"""Training curves where researchers look (`runtime.loggers`): TensorBoard event files and offline
Weights & Biases runs, beside metrics.jsonl.

metrics.jsonl is always written: it is the run's own step log, the one resume reads back and trims to the
checkpoint, so a list without `jsonl` is refused rather than silently ignored. The other loggers only
observe: they get the rows the trainer writes there (and validation values), never change what is trained.

Tags: `loss/total` (the row's `loss`), `loss/<part>` (the method's named parts: its loss terms and the few
measurements it reports with them, e.g. `masked_patches`), `train/lr`, `train/images_per_s`,
`train/grad_norm`, `train/logit_scale` with `train/temperature` = 1 / logit_scale (CLIP's tau, the number
papers quote), `monitor/<name>` (a monitor's values, e.g. AttMIM's hit rate) and `val/<metric>` (validation
after an epoch); a key that already holds a `/` is its own tag. `step` and `epoch` are the x axis, not
curves; None and non-finite values are left out, as a curve cannot show them."""
from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from bench.core.checks import list_of, one_of
from bench.core.errors import UserError

LOGGERS = ("jsonl", "tensorboard", "wandb")
# metrics.jsonl's columns the trainer writes itself; any other column of a row is one of the method's parts
TRAINER_COLUMNS = ("lr", "images_per_s", "grad_norm")
AXES = ("step", "epoch")
TENSORBOARD_DIR = "tensorboard"
_noted_missing: set[str] = set()  # a note per process, not one per fine-tuning run


def check_loggers(key: str, value: Any) -> str | None:
    """The config rule of runtime.loggers: known names, `jsonl` among them, and wandb only where installed
    (refused before any work rather than noticed after pretraining)."""
    problem = list_of(one_of(LOGGERS), distinct=True)(key, value)
    if problem:
        return problem
    if "jsonl" not in value:
        return ("a list that includes jsonl, e.g. [jsonl, tensorboard]: metrics.jsonl is the run's own step log, "
                "which resume reads back")
    if "wandb" in value and importlib.util.find_spec("wandb") is None:
        raise UserError(f"{key} has wandb, but the wandb package is not installed: pip install wandb (it logs "
                        f"offline, into the run folder), or leave wandb out")
    return None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The curves of one row: {tag: value} by the rules of the module docstring."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in AXES or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if "/" in key:
            out[key] = float(value)
        elif key == "loss":
            out["loss/total"] = float(value)
        elif key in TRAINER_COLUMNS:
            out[f"train/{key}"] = float(value)
        elif key == "logit_scale":
            out["train/logit_scale"] = float(value)
            if value > 0:
                out["train/temperature"] = 1.0 / value
        else:
            out[f"loss/{key}"] = float(value)
    return out


class Sink(Protocol):
    """One place curves go to."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in `folder`. `resumed_at` is the step of the checkpoint training goes on from: events of
    later steps, written by the killed process after its last checkpoint, are purged (TensorBoard's
    `purge_step`), so the curves hold each step once, as metrics.jsonl does. On a fresh start (0) it purges
    the curves of an earlier run in the same folder (a fine-tuning job run again after its weights were
    removed)."""

    def __init__(self, folder: Path, resumed_at: int):
        from torch.utils.tensorboard import SummaryWriter

        # logged steps are 1-based (the row after optimiser step k carries step k), so the first step trained
        # again is resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resumed_at + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """An offline Weights & Biases run in `folder/wandb` (never the network: `wandb sync` uploads it later).
    Each start of a training run is its own offline run, grouped under `name`, so after a resume no wandb run
    holds a step twice (the resumed one starts at the checkpoint's next step)."""

    def __init__(self, folder: Path, name: str):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(folder), project="medvlp-bench", name=name, group=name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Curves:
    """The loggers of one training run besides metrics.jsonl; `log` takes rows as the trainer writes them."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.sinks:
            return
        values = scalars(row)
        if values:
            for sink in self.sinks:
                sink.log(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_curves(loggers: Iterable[str], folder: Path, resumed_at: int = 0, name: str | None = None) -> Curves:
    """The sinks `loggers` (runtime.loggers) names, writing under `folder`: TensorBoard into `folder/tensorboard`
    (`folder/tensorboard/<name>` with a `name`, so that one logdir compares several runs, e.g. a sweep's
    trials), wandb into `folder/wandb` as a run called `name` (default: the folder's). `jsonl` is the trainer's
    own metrics.jsonl. TensorBoard named but not installed: one note on stderr, and training goes on without it."""
    folder, names = Path(folder), list(loggers)
    sinks: list[Sink] = []
    if "tensorboard" in names:
        if importlib.util.find_spec("tensorboard") is None:
            if "tensorboard" not in _noted_missing:
                _noted_missing.add("tensorboard")
                print("bench: runtime.loggers has tensorboard, but the tensorboard package is not installed: no "
                      "TensorBoard curves (pip install tensorboard)", file=sys.stderr)
        else:
            sinks.append(TensorBoardSink(folder / TENSORBOARD_DIR / (name or ""), resumed_at))
    if "wandb" in names:
        sinks.append(WandbSink(folder, name or folder.name))
    return Curves(sinks)
