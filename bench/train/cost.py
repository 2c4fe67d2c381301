"""What a training run cost, whatever the method: optimiser steps, samples of each kind seen, and model FLOPs
per step, counted once on the run's first batch (in one process; under DDP they are not counted, None). The
trainer writes it to `cost.json` beside the weights and every evaluation record of the model carries it, so a
table can put cost next to the numbers it bought."""
from __future__ import annotations

import gc

import torch

from bench.data.batch import Batch
from bench.modeling.method import Method

COST_FILE = "cost.json"


def count_flops(method: Method, batch: Batch, dtype: torch.dtype | None, device: torch.device) -> tuple[int, str]:
    """Model FLOPs of one forward and backward of `batch` (matmuls, convolutions, attention), counted eager
    and without activation checkpointing (so recomputation is not counted), and how: `counted`, or where the
    batch does not fit in memory that way, `3x-forward` (a forward without gradient, and backward taken as
    twice the forward, the usual convention). The gradients are cleared afterwards."""
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


def run_cost(steps: int, accumulate: int, per_batch: dict[str, int], flops_per_step: int | None,
             flops_how: str | None) -> dict:
    """The cost record of `steps` optimiser steps of `accumulate` batches of `per_batch` rows per kind (global
    over processes), each optimiser step costing `flops_per_step`."""
    return {"optimizer_steps": int(steps),
            "samples": {kind: int(steps) * int(accumulate) * int(n) for kind, n in per_batch.items() if n},
            "flops_per_step": flops_per_step, "flops_counted": flops_how,
            "flops": None if flops_per_step is None else int(flops_per_step) * int(steps)}


UNTRAINED = run_cost(0, 1, {}, 0, "untrained")  # the random-init baseline's: nothing was trained
