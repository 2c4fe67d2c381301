"""One experiment as a resumable chain: data -> pretraining -> every (dataset x protocol) evaluation ->
records. Each link skips what is already finished, so re-running the same command after a kill resumes.
`bench run`, `bench suite` and `bench sweep --finalize` all run models through `pretrain_and_evaluate`."""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from bench.core.progress import QUIET, display_mode
from bench.core.results import ResultsStore
from bench.experiment.contamination import announce
from bench.experiment.evaluating import Subject, evaluate, random_init_subject, report_timing, subject_of_run
from bench.experiment.pretraining import build_method, pretrain
from bench.experiment.setup import start
from bench.train import distributed


def pretrain_and_evaluate(cfg: DictConfig, store: ResultsStore, device: torch.device, random_init: bool = False,
                   force: bool = False, provenance: dict | None = None) -> tuple[Subject, dict]:
    """Pretrain the run of `cfg` (or resume, or reuse it) and evaluate it; with `random_init`, evaluate the same
    architecture untrained instead (the `random-init` baseline: the pretrained model's exact starting point).
    Returns the model's identity and `evaluate`'s summary, with the seconds pretraining (or building the
    untrained model) and evaluating took (`pretrain_s`, `evaluate_s`)."""
    started = time.perf_counter()
    if random_init:
        method = build_method(cfg, cfg.seed)
        subject = random_init_subject(cfg, method)
        method.to(device)
    else:
        if distributed.is_main():
            announce(cfg)
        method, final = pretrain(cfg, store, device)
        subject = subject_of_run(cfg, final)
    pretrained = time.perf_counter()
    summary = evaluate(cfg, method, subject, store, device, force, provenance)
    return subject, {**summary, "pretrain_s": pretrained - started, "evaluate_s": time.perf_counter() - pretrained}


def run_experiment(cfg: DictConfig, force: bool = False) -> ResultsStore:
    """`bench run`: pretrain (or resume, or reuse) and evaluate; also evaluate the same architecture untrained."""
    device, store = start(cfg.runtime, cfg.results_dir)
    for random_init in (False, True) if cfg.eval.random_init_baseline else (False,):
        report_timing(*pretrain_and_evaluate(cfg, store, device, random_init, force),
                      quiet=display_mode(cfg.runtime.progress) == QUIET)
    return store
