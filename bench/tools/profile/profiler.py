"""Timing one configuration's variants step by step."""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from bench.data.batch import Batch
from bench.experiment.config import compose_config
from bench.modeling.method import Method
from bench.tools.profile.inputs import cycle_batches, images_per_batch, loader_batches, loader_rate, synthetic_batches
from bench.tools.profile.measure import (MemoryMeter, batch_tensors, device_name, measured_bf16_tflops,
                                         synchronize, tensor_bytes, vendor_bf16_tflops)
from bench.train.cost import count_flops
from bench.train.speed import Speed, loader_workers
from bench.train.trainer import Trainer, param_groups

INPUTS = ("synthetic", "files")
VARIANTS = ("trainer", "plain")
# what profiling needs from a preset, whatever its weights: no hub download, a real tokenizer's vocabulary
OFFLINE = ("model.image.pretrained=null", "model.text.pretrained=null", "model.text.tokenizer=bundled-minilm",
           "runtime.progress=false")
# dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, by device-name fragment;
# the first fragment found in the name wins, so specific names come before general ones


@dataclass(frozen=True)
class Config:
    method: str
    ablation: str
    preset: str
    input: str

    @property
    def label(self) -> str:
        name = self.method if self.ablation == "none" else f"{self.method}:{self.ablation}"
        return f"{name} {self.preset} {self.input}"


@dataclass
class Contestant:
    variant: str
    method: Method
    step: Callable[[], None]
    resident: Callable[[], int]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0


class Profiler:
    def __init__(self, device: torch.device, steps: int, warmup: int, loader_batches: int, workers: int | None):
        self.device, self.steps, self.warmup = device, steps, warmup
        self.loader_batches, self.workers = loader_batches, workers
        self.memory = MemoryMeter(device)
        self.peak_measured = measured_bf16_tflops(device)
        self.peak_vendor = vendor_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))

    def run(self, config: Config, variants: list[str], overrides: list[str]) -> list[dict]:
        """One line per variant of `config`; an out-of-memory configuration gets a line with `error`."""
        try:
            return self._run(config, variants, overrides)
        except torch.OutOfMemoryError as exc:
            first = str(exc).splitlines()[0]
            return [{**self._identity(config, variant, None), "error": f"out of memory: {first}"}
                    for variant in variants]
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _identity(self, config: Config, variant: str, cfg: DictConfig | None) -> dict:
        row = {"method": config.method, "ablation": config.ablation, "preset": config.preset,
               "input": config.input, "variant": variant, "device": device_name(self.device)}
        if cfg is not None:
            row.update(batch_size=int(cfg.trainer.batch_size), image_size=int(cfg.model.image.image_size),
                       precision=str(cfg.trainer.precision))
        return row

    def _run(self, config: Config, variants: list[str], overrides: list[str]) -> list[dict]:
        from bench.experiment.pretraining import build_corpus, build_method

        cfg = compose_config(config.method, config.ablation, 0,
                             [*OFFLINE, f"model={config.preset}", f"results_dir={self.workdir}", *overrides])
        trainer = Trainer(cfg.trainer, self.workdir / "run", self.device, progress=False,
                          num_workers=self._workers(cfg), speed=Speed.resolve(cfg.runtime.speed, self.device))
        methods = [build_method(cfg, 0) for _ in variants]
        collate = methods[0].make_collate()  # the same cfg, so the same collate for every variant
        loader, on_device = None, []
        if config.input == "synthetic":
            batches, corpus = synthetic_batches(cfg, methods[0], 3, seed=0)
            on_device = [b.to(self.device) for b in batches]
        else:
            corpus, sampler, _ = build_corpus(cfg, 0)
            if self.loader_batches:
                loader = loader_rate(trainer, corpus, sampler, collate, 0, self.loader_batches)
        contestants, flops, flops_how = [], None, None
        for variant, method in zip(variants, methods):
            stream = cycle_batches(on_device) if on_device else loader_batches(trainer, corpus, sampler, collate, 0)
            method.prepare(corpus)
            method.to(self.device)
            if flops is None:  # the same model in every variant; counted eager, before any speed switch
                flops, flops_how = count_flops(method, next(stream).to(self.device), trainer.dtype, self.device)
            contestants.append(self._trainer_contestant(trainer, method, stream, on_device) if variant == "trainer"
                               else self._plain_contestant(method, stream, on_device))
        for i in range(self.warmup + self.steps):
            for c in contestants:
                self._timed_step(c, keep=i >= self.warmup)
        rows = [{**self._row(config, cfg, c, flops, loader, trainer), "flops_how": flops_how} for c in contestants]
        for c in contestants:
            trainer.speed.take_off(c.method)
        plain = next((r for r in rows if r["variant"] == "plain"), None)
        if plain is not None:
            for r in rows:
                r["speedup_vs_plain"] = plain["step_ms"] / r["step_ms"]
        return rows

    def _workers(self, cfg: DictConfig) -> int:
        return loader_workers(cfg.runtime.num_workers if self.workers is None else self.workers, self.device)

    def _trainer_contestant(self, trainer: Trainer, method: Method, stream: Iterator[Batch],
                            on_device: list[Batch]) -> Contestant:
        model, optimizer = trainer.setup(method)
        counter = iter(range(10 ** 9))

        def step() -> None:
            trainer.optimizer_step(model, optimizer, stream, next(counter))

        return Contestant("trainer", method, step, lambda: self._resident(method, optimizer, on_device))

    def _plain_contestant(self, method: Method, stream: Iterator[Batch], on_device: list[Batch]) -> Contestant:
        optimizer = torch.optim.AdamW(param_groups(method, 0.05, 1e-4), lr=1e-4)

        def step() -> None:
            method.train()
            method(next(stream).to(self.device)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Contestant("plain", method, step, lambda: self._resident(method, optimizer, on_device))

    @staticmethod
    def _resident(method: Method, optimizer: torch.optim.Optimizer, on_device: list[Batch]) -> int:
        state = [t for s in optimizer.state.values() for t in s.values()]
        return (tensor_bytes(method.parameters()) + tensor_bytes(method.buffers()) + tensor_bytes(state)
                + sum(tensor_bytes(batch_tensors(b)) for b in on_device))

    def _timed_step(self, c: Contestant, keep: bool) -> None:
        synchronize(self.device)
        before = self.memory.start()
        started = time.perf_counter()
        c.step()
        synchronize(self.device)
        seconds = time.perf_counter() - started
        if keep:
            c.seconds.append(seconds)
            if self.memory.available:
                c.peak_bytes = max(c.peak_bytes, c.resident() + self.memory.peak() - before)

    def _row(self, config: Config, cfg: DictConfig, c: Contestant, flops: int | None, loader: float | None,
             trainer: Trainer) -> dict:
        step_s = statistics.median(c.seconds)
        batch = int(cfg.trainer.batch_size)
        images = images_per_batch(cfg)
        row = {**self._identity(config, c.variant, cfg),
               "steps": len(c.seconds), "warmup": self.warmup,
               "step_ms": step_s * 1000.0,
               "step_ms_p10": float(np.percentile(c.seconds, 10)) * 1000.0,
               "step_ms_p90": float(np.percentile(c.seconds, 90)) * 1000.0,
               "samples_per_s": batch / step_s, "images_per_s": images / step_s,
               "peak_memory_mb": c.peak_bytes / 2 ** 20 if self.memory.available else None,
               "memory": self.memory.kind,
               "params_m": sum(p.numel() for p in c.method.parameters()) / 1e6,
               "flops_per_step": flops,
               "tflops_per_s": None if flops is None else flops / step_s / 1e12}
        if self.device.type == "cuda" and flops is not None:
            achieved = flops / step_s / 1e12
            row.update(peak_tflops_measured=self.peak_measured, peak_tflops_vendor=self.peak_vendor,
                       mfu=achieved / self.peak_measured if self.peak_measured else None,
                       mfu_vendor=achieved / self.peak_vendor if self.peak_vendor else None)
        if c.variant == "trainer":
            row["speed"] = trainer.speed.as_dict()
        if config.input == "files":
            row.update(workers=trainer.num_workers, loader_images_per_s=loader,
                       loader_ratio=None if not loader else loader / row["images_per_s"])
        return row
