"""`bench step-time`: the cost of one training step (forward, backward, optimiser) of several methods on real
corpus batches, as median milliseconds and a ratio to the first method. The methods take turns step by step,
so a machine that speeds up or slows down during the measurement affects them all alike."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from bench.config import compose_config
from bench.method import Batch, Method
from bench.pipeline import build_corpus, build_method
from bench.trainer import param_groups


@dataclass
class _Contestant:
    spec: str
    method: Method
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    seconds: list[float] = field(default_factory=list)

    def step(self, i: int) -> float:
        started = time.perf_counter()
        self.method.training_step(self.batches[i % len(self.batches)]).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def _contestant(spec: str, overrides: list[str], n_batches: int) -> _Contestant:
    method_name, _, ablation = spec.partition(":")
    cfg = compose_config(method_name, ablation or "none", 0, overrides)
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    method.prepare(corpus)
    method.train()
    collate = method.make_collate()
    batches = [collate([corpus[i] for i in idx]) for idx in sampler.batches()[:n_batches]]
    return _Contestant(spec, method, torch.optim.AdamW(param_groups(method, 0.05, 1e-4), lr=1e-4), batches)


def step_times(specs: list[str], overrides: list[str], steps: int = 10, warmup: int = 2) -> list[tuple[str, float]]:
    """(METHOD[:ABLATION], median ms per step) for each spec; batches are collated beforehand, so only the
    step itself is timed."""
    contestants = [_contestant(spec, overrides, min(steps, 8)) for spec in specs]
    for i in range(warmup + steps):
        for c in contestants:
            seconds = c.step(i)
            if i >= warmup:
                c.seconds.append(seconds)
    return [(c.spec, statistics.median(c.seconds) * 1000.0) for c in contestants]


def render(times: list[tuple[str, float]]) -> str:
    base = times[0][1]
    lines = [f"{'method':<28} {'ms/step':>9} {'ratio':>7}"]
    lines += [f"{spec:<28} {ms:>9.1f} {ms / base:>6.2f}x" for spec, ms in times]
    return "\n".join(lines)
