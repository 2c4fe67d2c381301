"""`bench export RUN_DIR --out DIR` and `EmbeddingModel.save_pretrained`: a model as a self-contained folder (the
format: bench.experiment.export) with a model card that holds its provenance and its evaluation tables.

Saved weights keep the record identity of the run they came from only while they are that run's weights
(`Origin`): weights changed after loading, an unfinished run's or an untrained model's are saved under an
identity of their own, so their records can never be taken for the run's. Every folder is rebuilt from what was
written and must give the source model's features before it counts as written."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.hashing import stable_hash
from bench.experiment.checkpoints import load_weights, run_config, run_folder
from bench.experiment.evaluating import weights_digest
from bench.experiment.export import (
    CARD,
    COST,
    WEIGHTS,
    export_description,
    export_identity,
    export_provenance,
    read_config,
    write_export,
)
from bench.experiment.identity import config_hash
from bench.experiment.pretraining import build_method
from bench.modeling.method import Method


def build_keeping_random_state(cfg: DictConfig) -> Method:
    """`build_method` (which seeds every global generator with the run's seed) leaving the caller's random
    streams as they were: a library call must not reseed its user's program."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return build_method(cfg, int(cfg.seed))
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@dataclass
class Origin:
    """Where a loaded model's weights came from: saved again unchanged (`digest`), they keep `identity` (the
    record identity of their run; None: no run's), `provenance`, the run's `records` for the card (or an export's
    own `card`) and its `cost` file."""

    identity: dict | None
    digest: str
    provenance: dict
    records: list[dict] = field(default_factory=list)
    card: str | None = None
    cost: Path | None = None
    source: str = ""


def unknown_origin(method: Method, source: str, run_dir: Path | None = None) -> Origin:
    """The origin of weights that are no finished run's (untrained, built by the caller, an unfinished run's)."""
    return Origin(None, weights_digest(method), export_provenance(run_dir), source=source)


def run_origin(run_dir: Path, weights: Path, cfg: DictConfig, method: Method) -> Origin:
    """The origin of a run folder's weights: the run's identity (as its records name it) for final.pt; none for an
    unfinished run's checkpoint.pt, whose weights are not the run's pretrained model."""
    if weights.name != "final.pt":
        print(f"bench: {run_dir} has not finished (no final.pt): its checkpoint.pt is loaded, and is not the run's "
              f"pretrained model", file=sys.stderr)
        return unknown_origin(method, str(weights), run_dir)
    identity = export_identity(cfg, weights)
    results_root = run_dir.parent.parent if run_dir.parent.name == "runs" else run_dir
    records = run_records(results_root, identity)
    # the hash the run's records carry: today's defaults may have added settings since it was trained
    hashes = {r["pretrain_hash"] for r in records}
    if len(hashes) == 1:
        identity["pretrain_hash"] = hashes.pop()
    elif not run_dir.name.startswith(f"{cfg.method.name}-{cfg.ablation}-{identity['pretrain_hash'][:10]}-"):
        print(f"bench: {run_dir}: its pretrain hash under today's defaults ({identity['pretrain_hash'][:10]}) is not "
              f"the one in its folder's name, and no records say which it was", file=sys.stderr)
    return Origin(identity, weights_digest(method), export_provenance(run_dir), records, None, run_dir / COST,
                  str(run_dir))


def export_origin(folder: Path, written: dict, method: Method) -> Origin:
    """The origin of an exported folder's weights: what it says of itself, its card and cost carried over."""
    card, cost = folder / CARD, folder / COST
    return Origin(written["identity"], weights_digest(method), written["provenance"],
                  card=card.read_text() if card.is_file() else None, cost=cost if cost.is_file() else None,
                  source=str(folder))


def derived_identity(cfg: DictConfig, digest: str, source: str, untrained: bool = False) -> dict:
    """The record identity of weights that are no run's pretrained model: keyed by their digest, named
    `untrained` or `derived`, so that their records never share a key with a run's."""
    return {"method": str(cfg.method.name), "ablation": "untrained" if untrained else "derived",
            "pretrain_hash": stable_hash(["derived", digest]), "pretrain_seed": int(cfg.seed),
            "config_hash": config_hash(cfg), "checkpoint": {"path": source, "sha256": None, "weights_sha256": digest}}


def save_model(method: Method, cfg: DictConfig, out: str | os.PathLike, origin: Origin) -> Path:
    """Write `method` (built from `cfg`) as an export folder at `out`, then check that the folder rebuilds the
    same model (removing it if not)."""
    digest = weights_digest(method)
    if origin.identity is not None and digest == origin.digest:
        identity, provenance, records = origin.identity, origin.provenance, origin.records
        card, cost = origin.card, origin.cost
    else:
        untrained = origin.identity is None and origin.source.startswith("untrained")
        identity = derived_identity(cfg, digest, origin.source, untrained)
        provenance = {**export_provenance(None), "derived_from": origin.source}
        records, card, cost = [], None, None
    config = export_description(method, cfg, identity, provenance)
    folder = write_export(method, config, Path(out), card or model_card(config, records), cost)
    try:
        check_rebuilt(folder, method, cfg)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def check_rebuilt(folder: Path, method: Method, cfg: DictConfig) -> None:
    """Rebuild the model from the folder alone and compare its features with `method`'s on fixed inputs: a
    setting the rebuilt configuration lost (an activation, a vocabulary) would load cleanly and differ silently."""
    rebuilt_cfg, _ = read_config(folder)
    rebuilt = build_keeping_random_state(rebuilt_cfg)
    load_weights(rebuilt, folder / WEIGHTS)
    image = cfg.model.image
    size, channels = int(image.image_size), int(image.get("channels", 3))
    images = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    texts = ["No acute cardiopulmonary process.", "Small left pleural effusion with basal atelectasis."]
    device = next(method.parameters()).device
    modes = [(m, m.training) for m in method.modules()]
    method.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            pairs = [(method.encode_image(images.to(device)).float().cpu(), rebuilt.encode_image(images).float())]
            if method.has_joint_space(cfg):
                pairs.append((method.embed_text(method.tokenizer(texts).to(device)).float().cpu(),
                              rebuilt.embed_text(rebuilt.tokenizer(texts)).float()))
    finally:
        for module, mode in modes:
            module.training = mode
    for ours, theirs in pairs:
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
            gap = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else "shapes differ"
            raise UserError(f"{folder}: the model rebuilt from its config.json gives other features than the one "
                            f"exported (largest difference {gap}); nothing was exported")




def run_records(results_root: Path, identity: dict) -> list[dict]:
    """The records of the exported run's weights in the results store it was trained in."""
    from bench.core.results import ResultsStore

    if not (results_root / "records").is_dir():
        return []
    sha = identity["checkpoint"]["sha256"]
    return [r for r in ResultsStore(results_root).records()
            if (r.get("checkpoint") or {}).get("sha256") == sha and r.get("method") == identity["method"]]


def model_card(config: dict, records: list[dict]) -> str:
    """README.md of an exported model: hub metadata, what the model is, how to load it, where it came from, and
    its evaluation tables (one per protocol, from the run's own records)."""
    from bench.core.registry import PROTOCOLS
    from bench.report.table import build_table

    ident, prov = config["identity"], config["provenance"]
    pre = config["preprocessing"]
    lines = [
        "---", "library_name: medvlp-bench", "tags:", "- medical-imaging", "- chest-x-ray", "- vision-language",
        f"- {config['method']}", "pipeline_tag: zero-shot-image-classification" if config["joint_space"] else
        "pipeline_tag: image-feature-extraction", "---", "",
        f"# {config['method']} ({config['ablation']}), seed {ident['pretrain_seed']}", "",
        (f"A `{config['method']}` model pretrained with medvlp-bench (ablation `{config['ablation']}`, model preset "
         f"`{config['model_preset']}`, joint space of {config['embed_dim']} dimensions)."), "",
        "## Use", "", *(["```python", "from bench import load_model", "",
                         'model = load_model("path/to/this/folder")   # or the hub name it was pushed to',
                         'image_features, text_features = model.encode("image.png", "Small right pleural effusion.")',
                         "```"] if config["joint_space"] else
                        [("No joint image-text space: `bench eval --checkpoint path/to/this/folder` evaluates its "
                          "image encoder (linear probe, fine-tuning, segmentation).")]), "",
        (f"Images: {pre['reader']}; {pre['resize']} ({pre['image_size']} px); {pre['scale']}, normalised with mean "
         f"{pre['mean']} and std {pre['std']}; {pre['channel_handling']} ({pre['channels']})."), "",
        "## Provenance", "",
        (f"- pretrain hash `{ident['pretrain_hash']}`, config hash `{ident['config_hash']}`, seed "
         f"{ident['pretrain_seed']}"),
        f"- weights from `{ident['checkpoint']['path']}`"
        + (f" (sha256 `{ident['checkpoint']['sha256']}`)" if ident["checkpoint"].get("sha256") else ""),
        (f"- exported {prov['exported_at']} by medvlp-bench {prov['bench_version']} (git "
         f"{(prov['git'] or {}).get('commit') or 'unknown'}{' dirty' if (prov['git'] or {}).get('dirty') else ''})"),
    ]
    corpus = prov.get("corpus") or {}
    if prov.get("derived_from"):
        lines.append(f"- not a run's pretrained weights: derived from {prov['derived_from']}")
    if corpus:
        lines.append(f"- pretraining corpus: `{json.dumps(corpus, sort_keys=True)}`")
    lines += ["", "## Evaluation", ""]
    if not records:
        lines.append("No evaluation records were found beside the run when it was exported.")
    for protocol in sorted({r["protocol"] for r in records},
                           key=lambda p: (PROTOCOLS.get(p).order, p) if p in PROTOCOLS.names() else (99, p)):
        mine = [r for r in records if r["protocol"] == protocol]
        present = sorted({m for r in mine for m in (r.get("metrics") or {})})
        metrics = PROTOCOLS.get(protocol).headline_metrics(present) if protocol in PROTOCOLS.names() else present[:1]
        for metric in metrics:
            holding = [r for r in mine if metric in (r.get("metrics") or {})]  # retrieval's differ by dataset
            lines += [f"### {protocol}: {metric}", "", build_table(holding, metric, protocol), ""]
    return "\n".join(lines).rstrip() + "\n"


def export_run(spec: str, out: str | os.PathLike) -> Path:
    """`bench export RUN_DIR --out DIR`: the finished run's weights, configuration, tokenizer, cost and model card."""
    run_dir, weights = run_folder(spec)
    if weights.name != "final.pt":
        raise UserError(f"{run_dir}: the run has not finished (no final.pt); export a finished run")
    cfg = run_config(run_dir)
    method = build_keeping_random_state(cfg)
    load_weights(method, weights)
    return save_model(method, cfg, out, run_origin(run_dir, weights, cfg, method))
