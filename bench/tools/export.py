"""`bench export RUN_DIR --out DIR`: a finished run as a self-contained model folder (the format:
bench.experiment.export), with a model card that holds the run's provenance and its evaluation tables."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.core.errors import UserError
from bench.experiment.checkpoints import load_weights, run_config, run_folder
from bench.experiment.export import COST, export_description, export_identity, export_provenance, write_export
from bench.experiment.pretraining import build_method


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
        "## Use", "", "```python", "from bench import load_model", "",
        'model = load_model("path/to/this/folder")   # or the hub name it was pushed to',
        'image_features, text_features = model.encode("image.png", "Small right pleural effusion.")', "```", "",
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
    method = build_method(cfg, int(cfg.seed))
    load_weights(method, weights)
    identity, provenance = export_identity(cfg, weights), export_provenance(run_dir)
    results_root = run_dir.parent.parent if run_dir.parent.name == "runs" else run_dir
    config = export_description(method, cfg, identity, provenance)
    return write_export(method, config, Path(out), model_card(config, run_records(results_root, identity)),
                        run_dir / COST)
