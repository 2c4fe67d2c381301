"""One experiment as a resumable chain: data -> pretraining -> every (dataset x protocol) evaluation ->
records. Each link skips what is already finished, so re-running the same command after a kill resumes."""
from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.config import config_hash, eval_hash, pretrain_hash, stable_hash, to_plain
from bench.data import ImagePreprocessor, ImageTextDataset, collate_fn
from bench.datasets import Task, get_adapter
from bench.datasets.base import split_hashes
from bench.errors import UserError
from bench.evaluation import PROTOCOLS
from bench.io import atomic_write_text
from bench.method import Method
from bench.provenance import device_info, git_state, library_versions
from bench.registry import get_method
from bench.results import RecordKey, ResultsStore
from bench.trainer import Trainer, resolve_device, seed_everything

RANDOM_INIT = "random-init"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def prepare_data(cfg: DictConfig) -> None:
    """Generate the synthetic benchmark on first use; real data must already be there."""
    if cfg.data.get("synthetic"):
        from bench.synth import ensure_synthetic

        ensure_synthetic(Path(os.path.expanduser(cfg.data.root)), cfg.data.synthetic.size, cfg.data.synthetic.seed)


def load_dataset(name: str, dataset_cfg: DictConfig) -> tuple[pd.DataFrame, Task]:
    adapter = get_adapter(name)(os.path.expanduser(dataset_cfg.root), dataset_cfg)
    manifest = adapter.read()
    if manifest.empty:
        raise UserError(f"{name}: no usable samples under {adapter.root}")
    return manifest, adapter.task


def build_method(cfg: DictConfig, seed: int) -> Method:
    seed_everything(seed)
    return get_method(cfg.method.name)(cfg)


def pretrain(cfg: DictConfig, store: ResultsStore, device: torch.device) -> tuple[Method, Path]:
    phash = pretrain_hash(cfg)
    run_dir = store.run_dir(cfg.method.name, cfg.ablation, phash, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    method = build_method(cfg, cfg.seed)
    final = run_dir / "final.pt"
    if not final.exists():
        p = cfg.data.pretrain
        manifest, _ = load_dataset(p.dataset, p)
        train = manifest[manifest["split"] == "train"].reset_index(drop=True)
        image = cfg.model.image
        dataset = ImageTextDataset(train["image_path"], train["report"], train["sample_id"],
                                   ImagePreprocessor(image.image_size, image.mean, image.std, augment=True), cfg.seed)
        trainer = Trainer(cfg.trainer, run_dir, device, cfg.runtime.progress, cfg.runtime.num_workers)
        trainer.fit(method, dataset, collate_fn(method.tokenizer), cfg.seed)
    method.load_state_dict(torch.load(final, map_location="cpu", weights_only=False)["model"])
    return method.to(device), final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate(cfg: DictConfig, method: Method, identity: tuple[str, str, str], checkpoint: Path | None,
             store: ResultsStore, device: torch.device, force: bool = False) -> list[Path]:
    """Every configured (dataset x protocol) for one model; finished records are skipped unless `force`."""
    name, ablation, phash = identity
    unknown = [p for p in cfg.eval.protocols if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"unknown protocol(s) {', '.join(unknown)}; valid protocols: {', '.join(PROTOCOLS)}")
    written = []
    ckpt = {"path": str(checkpoint), "sha256": _sha256(checkpoint)} if checkpoint else None
    for dataset in cfg.eval.datasets:
        if dataset not in cfg.data.downstream:
            raise UserError(f"eval dataset {dataset!r} has no entry under data.downstream "
                            f"(configured: {', '.join(cfg.data.downstream)})")
        manifest = task = None
        for protocol in cfg.eval.protocols:
            fraction = float(cfg.eval.linear_probe.fraction) if protocol == "linear-probe" else 1.0
            key = RecordKey(name, ablation, phash, int(cfg.seed), dataset, protocol, fraction,
                            int(cfg.eval.seed), eval_hash(cfg, protocol))
            if store.exists(key) and not force:
                continue
            if manifest is None:
                manifest, task = load_dataset(dataset, cfg.data.downstream[dataset])
            started = time.time()
            out = PROTOCOLS[protocol](method, manifest, task, cfg, device, cfg.runtime.num_workers)
            record = {
                "metrics": out["metrics"], "per_class": out["per_class"], "n_test": out["n_test"],
                "chosen": out.get("chosen", {}), "task": {"labels": task.labels, "metric": task.metric},
                "config": to_plain(cfg), "config_hash": config_hash(cfg), "checkpoint": ckpt,
                "splits": split_hashes(manifest), "git": git_state(), "libraries": library_versions(),
                "device": device_info(device), "wall_time_s": round(time.time() - started, 3),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            written.append(store.write(key, record, out["predictions"]))
    return written


def run_experiment(cfg: DictConfig, force: bool = False) -> ResultsStore:
    """Pretrain (or resume, or reuse) and evaluate; also evaluate the same architecture untrained."""
    _quiet_libraries()
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    device = resolve_device(cfg.runtime.device)
    store = ResultsStore(cfg.results_dir)
    prepare_data(cfg)
    method, final = pretrain(cfg, store, device)
    evaluate(cfg, method, (cfg.method.name, cfg.ablation, pretrain_hash(cfg)), final, store, device, force)
    if cfg.eval.random_init_baseline:
        # the pretrained model's exact starting point: same architecture, same seed, no training
        untrained = build_method(cfg, cfg.seed).to(device)
        arch = stable_hash({"method": to_plain(cfg.method), "model": to_plain(cfg.model)})
        evaluate(cfg, untrained, (RANDOM_INIT, cfg.method.name, arch), None, store, device, force)
    return store
