"""The one trainer every method shares: AdamW, warm-up + cosine, accumulation, clipping, bf16 autocast on
GPU, step logs, atomic checkpoints and exact resume after a kill."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bench.core.errors import TrainingDiverged, UserError
from bench.core.io import atomic_torch_save, atomic_write_text
from bench.core.progress import QUIET, StepProgress, display_mode
from bench.data.corpus import MixedBatchSampler, PretrainCorpus
from bench.modeling.method import Method
from bench.train import distributed
from bench.train.cost import COST_FILE, count_flops, run_cost
from bench.train.loggers import open_curves
from bench.train.speed import Speed

CHECKPOINT, FINAL = "checkpoint.pt", "final.pt"


class Validation(Protocol):
    """An end-of-epoch check (e.g. early stopping on a validation metric) whose state resumes with the run. What
    it returns ({tag: value}, e.g. {"val/auc": 0.81}; or None) joins the run's curves at that step."""

    stop: bool

    def __call__(self, method: Method, epoch: int) -> dict[str, float] | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Monitor(Protocol):
    """A measurement taken every `every` optimiser steps (0 = never) on the main process, whose values join that
    step's row of metrics.jsonl (e.g. AttMIM's hit rate). The trainer runs it in eval mode without gradient,
    under training's autocast, then restores every module's mode and the random streams: it cannot change what
    is trained."""

    every: int

    def __call__(self, method: Method) -> dict[str, float | None]: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where there is one; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device={name} but no CUDA device is available")
    if name == "cuda" and distributed.launched():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def param_groups(method: Method, weight_decay: float, lr: float) -> list[dict]:
    """No weight decay on norms, biases, positional/class embeddings, the temperature and frozen weights;
    learning rates scaled by the method's `lr_multipliers` (e.g. a fine-tuned encoder at 0.1x its head's)."""
    skip, multipliers = method.no_weight_decay(), method.lr_multipliers()
    groups: dict[tuple[bool, float], list] = {}
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decay = not (p.ndim < 2 or name in skip or leaf in ("positional_embedding", "class_embedding"))
        prefix = max((k for k in multipliers if name.startswith(k)), key=len, default=None)
        scale = 1.0 if prefix is None else float(multipliers[prefix])
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def cosine_with_warmup(total_steps: int, warmup: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def training_steps(budget: DictConfig, steps_per_epoch: int) -> int:
    """Optimiser steps of a run under `trainer.budget`: `steps` where set, else `epochs` passes of
    `steps_per_epoch` each."""
    return int(budget.steps) if budget.get("steps") else steps_per_epoch * int(budget.epochs)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # a checkpoint loaded with map_location=cuda has its states on the GPU; the generators take CPU bytes
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Trainer:
    """`loggers` (runtime.loggers) adds curves beside metrics.jsonl, which is always written: TensorBoard and
    offline wandb under `run_dir` (bench.train.loggers). The default, none, suits scratch runs (`bench profile`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, progress: bool | str = True,
                 num_workers: int = 0, speed: Speed | None = None, flops: bool = True, loggers: Iterable[str] = ()):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.progress, self.num_workers, self.flops = progress, num_workers, flops
        self.loggers = list(loggers)
        self.speed = speed if speed is not None else Speed.resolve(None, device)
        self.dtype = autocast_dtype(cfg.precision, device)

    def fit(self, method: Method, dataset: PretrainCorpus, collate, sampler: MixedBatchSampler, seed: int,
            validation: Validation | None = None, monitor: Monitor | None = None) -> Path:
        """Train until the configured end, resuming from `run_dir/checkpoint.pt` when present.
        With `validation`, it is called after every epoch (and checkpointed with the weights), and training
        stops early once its `stop` is set. With `monitor`, its values are logged every `monitor.every` steps.
        Returns the path of the final weights; `cost.json` beside them says what the run cost
        (bench.train.cost), its FLOPs counted on the first batch where the trainer was made with `flops`.

        Under torchrun every rank calls this with the same arguments: `sampler`'s batches are global, each
        rank trains on its share of them, and only rank 0 writes files."""
        cfg = self.cfg
        final = self.run_dir / FINAL
        if distributed.agree(final.exists()):
            return final
        steps_per_epoch = len(sampler.batches()) // cfg.accumulate
        if steps_per_epoch == 0:
            raise UserError(f"trainer.accumulate={cfg.accumulate}: an epoch of {len(sampler.batches())} batches is "
                            f"shorter than one optimiser step; lower trainer.accumulate or trainer.batch_size")
        total = training_steps(cfg.budget, steps_per_epoch)
        # counted eager, before the speed switches (compilation, recomputation) go on; not under DDP, where the
        # forward's collectives (the loss's gather) would have to meet on every rank even if one ran out of memory
        # counting: `bench profile` counts a step of any configuration on one process
        count = self.flops and distributed.world_size() == 1
        flops = self.step_flops(method, dataset, sampler, collate) if count else (None, None)
        model, optimizer = self.setup(method)
        try:
            return self._fit(method, model, optimizer, dataset, collate, sampler, seed, validation, total,
                             steps_per_epoch, monitor, flops)
        finally:
            self.speed.take_off(method)

    def _fit(self, method: Method, model: torch.nn.Module, optimizer, dataset: PretrainCorpus, collate,
             sampler: MixedBatchSampler, seed: int, validation: Validation | None, total: int,
             steps_per_epoch: int, monitor: Monitor | None = None, flops: tuple = (None, None)) -> Path:
        cfg, final = self.cfg, self.run_dir / FINAL
        if distributed.world_size() > 1:
            # ranks must not draw the same masks and dropout; a single process keeps the stream it was given
            seed_everything(distributed.seed_of_rank(seed))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(total, cfg.warmup_steps, cfg.min_lr_ratio))
        step = self._resume(method, optimizer, schedule, validation)
        main = distributed.is_main()
        log = self._open_log(step) if main else None
        curves = open_curves(self.loggers, self.run_dir, step) if main else None
        bar = self._bar(total, step) if main else None
        try:
            while step < total and not (validation is not None and validation.stop):
                epoch, in_epoch = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch, skip=in_epoch * cfg.accumulate)
                dataset.set_epoch(epoch)
                batches = iter(self.loader(dataset, sampler, collate, seed))
                for _ in range(steps_per_epoch - in_epoch):
                    t0 = time.perf_counter()
                    parts, n_images = self.optimizer_step(model, optimizer, batches, step)
                    schedule.step()
                    step += 1
                    seconds = time.perf_counter() - t0
                    row = {"step": step, "epoch": epoch, "lr": schedule.get_last_lr()[0],
                           "images_per_s": n_images / seconds, **parts}
                    measured = self.measure(method, monitor) if (
                        main and monitor is not None and monitor.every and step % monitor.every == 0) else {}
                    if log is not None:
                        log.write(json.dumps({**row, **measured}) + "\n")
                        log.flush()
                    if curves is not None:
                        curves.log({**row, **{f"monitor/{k}": v for k, v in measured.items()}}, step)
                    if bar is not None:
                        bar.step(parts["loss"], n_images, seconds)
                    end_of_epoch = step % steps_per_epoch == 0
                    if validation is not None and end_of_epoch:
                        # the check must not move the random streams training draws from (dropout, masks), so
                        # a run with a validation hook trains exactly as one without it
                        rng = _rng_state()
                        validated = validation(method, epoch)
                        _set_rng_state(rng)
                        if curves is not None and validated:
                            curves.log(validated, step)
                        # rank 0's verdict: a rank that stopped alone would leave the others waiting for it
                        validation.stop = distributed.agree(validation.stop)
                    if step % cfg.checkpoint_every == 0 or step == total or (validation is not None and end_of_epoch):
                        self._save(method, optimizer, schedule, step, validation)
                    if step >= total or (validation is not None and validation.stop):
                        break
        finally:
            if log is not None:
                log.close()
            if curves is not None:
                curves.close()
            if bar is not None:
                bar.close()
        if main:
            cost = run_cost(step, cfg.accumulate, sampler.per_batch, *flops)
            atomic_write_text(self.run_dir / COST_FILE, json.dumps(cost, indent=2) + "\n")
            atomic_torch_save(final, {"model": method.state_dict(), "step": step})
        distributed.barrier()  # every rank reads the final (and checkpoint, best) weights next
        return final

    def step_flops(self, method: Method, dataset: PretrainCorpus, sampler: MixedBatchSampler, collate
                   ) -> tuple[int, str]:
        """Model FLOPs of one optimiser step (one process), counted on the first batch (`accumulate` micro-batches
        taken alike), and how they were counted. Training is left exactly as it was: the random streams and the
        method's buffers are restored and the gradients cleared."""
        sampler.set_epoch(0)
        dataset.set_epoch(0)
        batch = collate([dataset[i] for i in next(iter(sampler))])
        rng, buffers = _rng_state(), {k: v.detach().clone() for k, v in method.named_buffers()}
        method.to(self.device)
        try:
            flops, how = count_flops(method, batch.to(self.device), self.dtype, self.device)
        finally:
            _set_rng_state(rng)
            with torch.no_grad():
                for name, value in method.named_buffers():
                    value.copy_(buffers[name])
        return flops * self.cfg.accumulate, how

    def measure(self, method: Method, monitor: Monitor) -> dict[str, float | None]:
        """`monitor(method)` in eval mode, without gradient, under training's autocast; every module's mode and
        every random stream are as they were afterwards (a monitor should draw from its own generator; this
        makes sure one that does not still leaves training as it was)."""
        rng, modes = _rng_state(), [(m, m.training) for m in method.modules()]
        method.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                 enabled=self.dtype is not None):
                return monitor(method)
        finally:
            for module, mode in modes:
                module.training = mode
            _set_rng_state(rng)

    def setup(self, method: Method) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """`method` on the device with the speed switches on (`self.speed.take_off` removes them), the module
        to call for a training step (the method, or its DDP wrapper) and its optimiser."""
        cfg = self.cfg
        method.to(self.device)
        self.speed.put_on(method)
        model = distributed.wrap(method, self.device)
        optimizer = torch.optim.AdamW(param_groups(method, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=tuple(cfg.betas),
                                      fused=self.speed.fused_optimizer or None)
        return model, optimizer

    def loader(self, dataset, sampler: MixedBatchSampler, collate, seed: int) -> DataLoader:
        """This rank's share of `sampler`'s batches (all of each batch in a single process)."""
        world = distributed.world_size()
        batches = sampler if world == 1 else distributed.RankSlice(sampler, distributed.rank(), world)
        # a private generator: creating a loader must not draw from the global RNG, or a resumed
        # run (which creates one mid-epoch) would drift from an uninterrupted one
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=self.num_workers,
                          pin_memory=self.speed.pin_memory, generator=torch.Generator().manual_seed(seed))

    def accumulate(self, model: torch.nn.Module, batches, step: int) -> tuple[dict, int]:
        """Forward and backward of one optimiser step's micro-batches through `model` (the method, or its
        DDP wrapper); returns the loss parts averaged over micro-batches and ranks, and the global number of
        samples. The gradients are left in the parameters."""
        model.train()
        totals: dict[str, float] = {}
        n_images = 0
        for micro in range(self.cfg.accumulate):
            batch = next(batches).to(self.device, non_blocking=True)
            batch.images = self.speed.images(batch.images)
            # DDP averages gradients over the ranks once, in the backward of an optimiser step's last micro-batch
            last = micro == self.cfg.accumulate - 1
            with model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext(), \
                    self.speed.kernels():
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    out = model(batch)
                # the loss is read back only once backward is queued: reading it first would leave the GPU idle
                # while the backward is being launched. A non-finite loss still stops before any update.
                (out.loss / self.cfg.accumulate).backward()
            parts = {"loss": out.loss.detach(), **out.parts}
            values = dict(zip(parts, torch.stack([torch.as_tensor(v, device=out.loss.device).float().reshape(())
                                                  for v in parts.values()]).tolist()))
            if not math.isfinite(values["loss"]):
                detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "loss")
                raise TrainingDiverged(
                    f"loss became {values['loss']} at step {step + 1} ({detail}); the last good "
                    f"checkpoint is kept in {self.run_dir}. Lower trainer.lr or enable trainer.grad_clip")
            n_images += len(batch)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.accumulate
        return distributed.mean_over_ranks(totals), n_images * distributed.world_size()

    def optimizer_step(self, model: torch.nn.Module, optimizer, batches, step: int) -> tuple[dict, int]:
        """One optimiser step: `accumulate`, clipping, the update; returns the loss parts and images."""
        totals, n_images = self.accumulate(model, batches, step)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip) if self.cfg.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if norm is not None:  # read after the update is queued, for the same reason as the loss
            totals["grad_norm"] = float(norm)
        return totals, n_images

    def _save(self, method: Method, optimizer, schedule, step: int, validation: Validation | None = None) -> None:
        rng = distributed.gather(_rng_state())  # every rank's streams: a resumed rank continues its own
        if not distributed.is_main():
            return
        atomic_torch_save(self.run_dir / CHECKPOINT, {
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "step": step, "rng": rng, "validation": None if validation is None else validation.state_dict(),
        })

    def _resume(self, method: Method, optimizer, schedule, validation: Validation | None = None) -> int:
        path = self.run_dir / CHECKPOINT
        if not distributed.agree(path.exists()):
            return 0
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
            raise UserError(f"{path}: checkpoint cannot be read ({exc}); delete it to start over") from None
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict before DDP support
        if len(rng) == distributed.world_size():
            _set_rng_state(rng[distributed.rank()])
        elif distributed.is_main():
            print(f"bench: {path} was written by {len(rng)} process(es), this run has {distributed.world_size()}: "
                  f"training goes on from step {state['step']} with fresh random streams (masks, dropout)",
                  file=sys.stderr)
        if validation is not None and state.get("validation") is not None:
            validation.load_state_dict(state["validation"])
        return int(state["step"])

    def _open_log(self, step: int):
        """metrics.jsonl keeps one row per optimiser step; rows past the checkpoint (from a killed run)
        are dropped so the log matches the weights."""
        path = self.run_dir / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line from a kill
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        return path.open("a")

    def _bar(self, total: int, step: int) -> StepProgress | None:
        """How the main process shows training's progress (`runtime.progress`, bench.core.progress)."""
        mode = display_mode(self.progress)
        return None if mode == QUIET else StepProgress(mode, total, step, self.run_dir.name)
