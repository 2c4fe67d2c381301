"""Multi-process training under `torchrun` (DDP): one process per GPU (NCCL), or per CPU slot (gloo).

Every rank runs the same chain in lockstep: pretraining and fine-tuning train one DDP model on a global
batch split evenly over the ranks, everything else is computed by every rank, and only rank 0 writes files.
A decision that depends on a file (does a record or a checkpoint exist?) is rank 0's, broadcast with
`agree`, so the ranks never disagree about which collective calls come next. Without torchrun
(WORLD_SIZE unset or 1) there is one rank, and the helpers leave a single process's work as it was.
"""
from __future__ import annotations

import atexit
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def init_from_env() -> tuple[int, int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...),
    once; returns (rank, world size, local rank)."""
    if launched() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # NCCL's collectives, object ones included, run on the current device
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return rank(), world_size(), local_rank()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def agree(obj: T) -> T:
    """Rank 0's value of `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def holding(lock, poll_s: float = 1.0) -> Iterator[None]:
    """`lock` (a bench.core.io.FileLock) held by rank 0 for the block, every rank waiting with it. The ranks agree
    after every try, so while another job holds the lock for hours no collective call waits long enough to
    time out (NCCL's default is 10 minutes)."""
    main = is_main()
    while not agree(lock.try_acquire() if main else False):
        time.sleep(poll_s)
    try:
        yield
    finally:
        if main:
            lock.release()


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it (for logging: a rank may lack a part, e.g. MLM on a
    batch with no masked word)."""
    if not _active():
        return values
    every = gather(values)
    keys = dict.fromkeys(k for v in every for k in v)
    return {k: float(np.mean([v[k] for v in every if k in v])) for k in keys}


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating or decoding data into shared caches), the others after
    it, so they find its results instead of redoing the work at the same time."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def seed_of_rank(seed: int) -> int:
    """A seed of its own for this rank's random streams (masks, dropout), from the run's seed."""
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` as DDP under several ranks (itself otherwise). Unused parameters are searched for because a
    method's branches do not all get gradients every step (MMCLIP's "no image" token, a batch without
    masked words); batches are moved to the device by the trainer."""
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


class RankSlice(Sampler[list[int]]):
    """This rank's share of each global batch of a MixedBatchSampler, whose batches are one contiguous block
    per kind in `sampler.sizes` order: rank r takes the r-th of `world` equal chunks of every block. So every
    rank has the same composition and row count (what the contrastive loss's gather assumes), and together
    the ranks cover the global batch once."""

    def __init__(self, sampler, rank: int, world: int):
        bad = {k: n for k, n in sampler.per_batch.items() if n % world}
        if bad:
            raise ValueError(f"per-batch counts {bad} do not split evenly over {world} ranks")
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            share, start = [], 0
            for kind in self.sampler.sizes:
                n = self.sampler.per_batch[kind]
                chunk = n // self.world
                share += batch[start + self.rank * chunk:start + (self.rank + 1) * chunk]
                start += n
            yield share

    def __len__(self) -> int:
        return len(self.sampler)
