"""What every command that computes does first, in one place."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from bench.core.progress import display_mode, set_process_mode
from bench.core.provenance import git_state
from bench.core.results import ResultsStore
from bench.train import distributed
from bench.train.trainer import resolve_device


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its "Loading weights" bars would print through ours, and into log files


def start(runtime: DictConfig, results_dir: str | None = None) -> tuple[torch.device, ResultsStore | None]:
    """Quiet the libraries, join the process group under torchrun, set torch's CPU threads
    (`runtime.threads`), pick the device (`runtime.device`) and, given a results folder, open its store and
    check it can be written before any work starts. Returns (device, store or None)."""
    quiet_libraries()
    git_state()  # the checkout as this process starts, which its records name
    distributed.init_from_env()
    set_process_mode(display_mode(runtime.get("progress", "auto"), main=distributed.is_main()))
    if runtime.threads:
        torch.set_num_threads(int(runtime.threads))
    device = resolve_device(runtime.device)
    if results_dir is None:
        return device, None
    store = ResultsStore(results_dir)
    store.check_writable()
    return device, store
