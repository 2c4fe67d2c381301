"""`bench profile`: how fast the shared trainer runs each method, against the hardware's limit.

One JSON line per configuration (method[:ablation] x model preset x input x variant):
- input `synthetic`: batches of random images and generated reports, built in memory and placed on the device
  beforehand, so a step is the model's work alone (what the GPU can consume);
- input `files`: the real path, the pretraining corpus read from disk (the synthetic benchmark, or your data
  roots) through the trainer's loader, workers and image cache; the line also says how many images/s the
  loader alone delivers;
- variant `trainer`: the trainer's optimiser step with the configured speed switches (runtime.speed);
  variant `plain`: a plain fp32 eager loop of the same model (forward, backward, AdamW) to compare against.

Timing is synchronised (the device is drained before and after each step) and the median over the timed
steps after warm-up is reported. The variants of one configuration take turns step by step, so a machine that
speeds up or slows down affects them alike and their ratio is measured in one run. Model FLOPs per step are
counted once (matmuls, convolutions, attention; forward and backward) on the eager model; MFU divides the
achieved FLOP rate by the device's bf16 peak, both as measured here with a large matmul and as the vendor
states it.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.data.corpus import KINDS, Pool, batch_composition
from bench.experiment.config import ablation_names, compose_config, corpus_sources
from bench.modeling.method import Batch, Method
from bench.train.speed import Speed, loader_workers
from bench.train.trainer import Trainer, param_groups, resolve_device

INPUTS = ("synthetic", "files")
VARIANTS = ("trainer", "plain")
# what profiling needs from a preset, whatever its weights: no hub download, a real tokenizer's vocabulary
OFFLINE = ("model.image.pretrained=null", "model.text.pretrained=null", "model.text.tokenizer=bundled-minilm",
           "runtime.progress=false")
# dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, by device-name fragment;
# the first fragment found in the name wins, so specific names come before general ones
VENDOR_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                      ("H800", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                      ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                      ("RTX 4090", 165.2), ("RTX 3090", 71.0))


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


def parse_methods(text: str) -> list[tuple[str, str]]:
    """`clip,mmclip:no-attmim` -> [(method, ablation)]; `all` = clip, mrm, mmclip and every mmclip ablation."""
    if text == "all":
        return [("clip", "none"), ("mrm", "none"), *(("mmclip", a) for a in ablation_names("mmclip"))]
    out = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        method, _, ablation = spec.partition(":")
        out.append((method, ablation or "none"))
    if not out:
        raise UserError("--methods names no method")
    return out


def configurations(methods: list[tuple[str, str]], presets: list[str], inputs: list[str]) -> list[Config]:
    bad = [i for i in inputs if i not in INPUTS]
    if bad:
        raise UserError(f"--inputs must be among {', '.join(INPUTS)}, got {', '.join(bad)}")
    return [Config(m, a, p, i) for p in presets for m, a in methods for i in inputs]


# --- the device's limit --------------------------------------------------------------------------------------
def vendor_bf16_tflops(name: str) -> float | None:
    return next((tflops for fragment, tflops in VENDOR_BF16_TFLOPS if fragment in name), None)


def measured_bf16_tflops(device: torch.device, n: int = 8192, repeats: int = 30) -> float | None:
    """The bf16 matmul rate this device reaches (TFLOP/s) on an n x n x n product, or None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n ** 3 * repeats / seconds / 1e12


# --- memory ---------------------------------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory of one step: CUDA's allocated bytes, or on CPU the process's resident set (its high-water
    mark is reset through /proc/self/clear_refs, Linux only). What other configurations keep resident is
    subtracted, what this one keeps resident (weights, optimiser state, device batches) is added."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda-allocated" if device.type == "cuda" else "process-rss"
        self.available = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS")

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.available = False
        return self._now()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status("VmHWM")


def _proc_status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _batch_tensors(batch: Batch) -> list[torch.Tensor]:
    out = []
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "input_ids"):
            out += [value.input_ids, value.attention_mask]
    return out


# --- batches ----------------------------------------------------------------------------------------------------
def synthetic_batches(cfg: DictConfig, method: Method, count: int, seed: int) -> tuple[list[Batch], object]:
    """`count` collated batches of `trainer.batch_size` rows mixed as the corpus would be (paired, image-only
    with its prompt, text-only), with random images and generated reports; and a stand-in corpus for
    `Method.prepare` (its reports)."""
    from bench.data.synth.findings import sample_patient
    from bench.data.synth.reports import write_report
    from bench.experiment.chain import corpus_channels, corpus_prompt

    image = cfg.model.image
    channels, size = corpus_channels(image), int(image.image_size)
    kinds = [k for k in KINDS if corpus_sources(cfg).get(k)]
    per_batch = batch_composition(int(cfg.trainer.batch_size), dict(cfg.data.corpus.mix), {k: 1 for k in kinds})
    prompt = corpus_prompt(cfg)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    collate = method.make_collate()
    batches, reports = [], []
    for b in range(count):
        items = []
        for kind in kinds:
            for j in range(per_batch[kind]):
                patient = sample_patient(rng)
                report = " ".join(part for part in write_report(patient, rng) if part)
                reports.append(report)
                pixels = None if kind == "text_only" else torch.randn(channels, size, size, generator=generator)
                text = report if kind != "image_only" else prompt(patient.labels()) if prompt else None
                items.append((pixels, text, f"synthetic:{b}:{kind}:{j}", kind, int(rng.integers(2 ** 31))))
        batches.append(collate(items))
    pools = {"paired": Pool("paired", ["synthetic-tensors"], [str(i) for i in range(len(reports))],
                            texts=reports)}
    return batches, _Corpus(pools)


@dataclass
class _Corpus:
    pools: dict[str, Pool]


def _forever(trainer: Trainer, corpus, sampler, collate, seed: int) -> Iterator[Batch]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        corpus.set_epoch(epoch)
        yield from trainer.loader(corpus, sampler, collate, seed)
        epoch += 1


def loader_rate(trainer: Trainer, corpus, sampler, collate, seed: int, batches: int) -> float:
    """Images per second the loader alone delivers (workers started, first batch excluded)."""
    stream = _forever(trainer, corpus, sampler, collate, seed)
    next(stream)
    images, started = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        images += 0 if batch.images is None else batch.images.shape[0]
    seconds = time.perf_counter() - started
    stream.close()
    return images / seconds


# --- one configuration, ready to step --------------------------------------------------------------------------
@dataclass
class Contestant:
    variant: str
    method: Method
    step: Callable[[], None]
    resident: Callable[[], int]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(method: Method, batch: Batch, dtype: torch.dtype | None, device: torch.device) -> tuple[int, str]:
    """Model FLOPs of one forward and backward of `batch` (matmuls, convolutions, attention), counted eager
    and without activation checkpointing (so recomputation is not counted), and how: `counted`, or where the
    batch does not fit in memory that way, `3x-forward` (a forward without gradient, and backward taken as
    twice the forward, the usual convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    method.train()
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    counter = FlopCounterMode(display=False)
    try:
        with counter:  # one block: entering the counter again would reset it
            with autocast:
                out = method(batch)
            out.loss.backward()
        return int(counter.get_total_flops()), "counted"
    except torch.OutOfMemoryError:
        pass  # handled below: until the except block is left, its traceback holds the activations
    finally:
        method.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), autocast:
        method(batch)
    return 3 * int(counter.get_total_flops()), "3x-forward"


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
               "input": config.input, "variant": variant, "device": _device_name(self.device)}
        if cfg is not None:
            row.update(batch_size=int(cfg.trainer.batch_size), image_size=int(cfg.model.image.image_size),
                       precision=str(cfg.trainer.precision))
        return row

    def _run(self, config: Config, variants: list[str], overrides: list[str]) -> list[dict]:
        from bench.experiment.chain import build_corpus, build_method

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
            stream = _cycle(on_device) if on_device else _forever(trainer, corpus, sampler, collate, 0)
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
        return (_tensor_bytes(method.parameters()) + _tensor_bytes(method.buffers()) + _tensor_bytes(state)
                + sum(_tensor_bytes(_batch_tensors(b)) for b in on_device))

    def _timed_step(self, c: Contestant, keep: bool) -> None:
        _synchronize(self.device)
        before = self.memory.start()
        started = time.perf_counter()
        c.step()
        _synchronize(self.device)
        seconds = time.perf_counter() - started
        if keep:
            c.seconds.append(seconds)
            if self.memory.available:
                c.peak_bytes = max(c.peak_bytes, c.resident() + self.memory.peak() - before)

    def _row(self, config: Config, cfg: DictConfig, c: Contestant, flops: int | None, loader: float | None,
             trainer: Trainer) -> dict:
        step_s = statistics.median(c.seconds)
        batch = int(cfg.trainer.batch_size)
        images = _images_per_batch(cfg)
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


def _images_per_batch(cfg: DictConfig) -> int:
    kinds = [k for k in KINDS if corpus_sources(cfg).get(k)]
    per_batch = batch_composition(int(cfg.trainer.batch_size), dict(cfg.data.corpus.mix), {k: 1 for k in kinds})
    return sum(n for k, n in per_batch.items() if k != "text_only")


def _cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def render(rows: list[dict]) -> str:
    """A table of the lines, for people."""
    head = f"{'configuration':<40} {'variant':<8} {'ms/step':>9} {'img/s':>8} {'peak MB':>9} {'MFU':>6} {'loader':>8}"
    lines = [head]
    for r in rows:
        name = Config(r["method"], r["ablation"], r["preset"], r["input"]).label
        if "error" in r:
            lines.append(f"{name:<40} {r['variant']:<8} {r['error']}")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        ratio = "" if r.get("loader_ratio") is None else f"{r['loader_ratio']:.1f}x"
        lines.append(f"{name:<40} {r['variant']:<8} {r['step_ms']:>9.1f} {r['images_per_s']:>8.0f} {peak:>9} "
                     f"{mfu:>6} {ratio:>8}")
    return "\n".join(lines)


def main(args) -> None:
    from bench.experiment.chain import quiet_libraries

    quiet_libraries()
    probe = compose_config("clip", "none", 0, [*OFFLINE, *args.overrides])
    if probe.runtime.threads:
        torch.set_num_threads(int(probe.runtime.threads))
    device = resolve_device(probe.runtime.device)
    presets = [p for p in (args.presets or ("base" if device.type == "cuda" else "tiny")).split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"--variants must be among {', '.join(VARIANTS)}, got {args.variants!r}")
    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    configs = configurations(parse_methods(args.methods), presets, [i for i in args.inputs.split(",") if i])
    profiler = Profiler(device, args.steps, args.warmup, args.loader_batches, args.workers)
    out = open(args.out, "a") if args.out else None
    rows = []
    try:
        for config in configs:
            for row in profiler.run(config, variants, overrides):
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
    finally:
        if out is not None:
            out.close()
        shutil.rmtree(profiler.workdir, ignore_errors=True)
    print(render(rows), file=sys.stderr)
