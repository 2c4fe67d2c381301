"""The `bench` command line. Flags for what users type most, Hydra overrides (key=value) for the rest."""
from __future__ import annotations

import argparse
import sys

from bench.errors import TrainingDiverged, UserError

EPILOG = """examples:
  bench run --method clip                         pretrain + evaluate on the synthetic benchmark
  bench run --method clip --ablation fixed-temperature --seed 1 trainer.epochs=2
  bench run --method clip data.mimic-cxr.root=/data/mimic-cxr-jpg/2.0.0 \\
            data.chexpert.root=/data/CheXpert-v1.0-small model=base
  bench table --metric auc
  bench data synth --size tiny --out /tmp/synthetic
  bench data inspect chexpert --root /data/CheXpert-v1.0-small --json --set uncertain_policy=ones
  bench run --method mmclip --ablation no-attmim
  bench run --method mmclip --ablation attmim-share-0.5
  bench mask --report "Small right pleural effusion. No pneumothorax." --json
  bench step-time --methods clip,mmclip
  bench list
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench", description="Pretrain, evaluate and compare medical vision-language models on chest X-rays.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    run = sub.add_parser("run", help="pretrain a method (resuming if interrupted) and evaluate it",
                         description="Pretrain METHOD (or resume/reuse its checkpoint), evaluate it with every "
                                     "configured protocol and dataset, write one record per evaluation and "
                                     "print the table. Finished work is skipped on re-runs.",
                         epilog="Trailing key=value items are Hydra overrides, e.g. trainer.epochs=2 model=tiny "
                                "eval.protocols=[zero-shot].")
    run.add_argument("--method", required=True, help="registered method (see `bench list`)")
    run.add_argument("--ablation", default="none", help="one of the method's ablations (default: none)")
    run.add_argument("--seed", type=int, default=None, help="pretraining seed (default: config's seed, 0)")
    run.add_argument("--results-dir", default=None, help="results root (default: ./results)")
    run.add_argument("--force", action="store_true", help="re-run evaluations that already have a record")
    run.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")

    table = sub.add_parser("table", help="aggregate records into a table (mean±std over seeds)",
                           description="Rows: method/ablation; columns: dataset and protocol; cells: mean±std (n) "
                                       "over seeds. Cells without a value say `missing`.")
    table.add_argument("--metric", default="auc", help="metric to show (default: auc)")
    table.add_argument("--protocol", default=None, help="only this protocol (e.g. zero-shot, linear-probe)")
    table.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
    table.add_argument("--results-dir", default="results", help="results root (default: ./results)")

    data = sub.add_parser("data", help="generate the synthetic benchmark; inspect a dataset root",
                          description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic benchmark (all six datasets, real layouts)",
                                description="Write the built-in synthetic benchmark: MIMIC-CXR-JPG, CheXpert, "
                                            "RSNA, SIIM-ACR, COVIDx and NIH ChestX-ray14 in their real on-disk "
                                            "formats. Deterministic by seed; an existing complete copy is kept.")
    synth.add_argument("--out", default=None, help="folder to write (default: the configured synthetic root)")
    synth.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=None, help="drawing processes (default: up to 4)")
    inspect = data_sub.add_parser("inspect", help="summarise a dataset root from its metadata files",
                                  description="Build DATASET's manifest from the metadata under --root and "
                                              "report samples, patients, splits, label counts and missing "
                                              "image files.")
    inspect.add_argument("dataset", help="adapter name (see `bench list`)")
    inspect.add_argument("--root", required=True, help="the dataset folder, as downloaded")
    inspect.add_argument("--json", action="store_true", help="print exactly one JSON object")
    inspect.add_argument("--strict", action="store_true",
                         help="missing or unreadable images are an error (decodes every image)")
    inspect.add_argument("--workers", type=int, default=None, help="decoding processes for --strict (default: "
                                                                      "all cores)")
    inspect.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                         help="a dataset option, e.g. --set uncertain_policy=ones (repeatable)")
    speed = data_sub.add_parser("throughput", help="images/s with and without the preprocessed-image cache",
                                description="Time decode+resize+normalise per image on DATASET's images: "
                                            "without the cache, filling it, and reading it.")
    speed.add_argument("dataset")
    speed.add_argument("--root", required=True)
    speed.add_argument("--image-size", type=int, default=224)
    speed.add_argument("--limit", type=int, default=500, help="images to time (default 500)")
    speed.add_argument("--cache-dir", default=None, help="where to put the timed cache (default: a temp dir)")

    mask = sub.add_parser("mask", help="show what AttMIM and EntMLM hide for an image and a report",
                          description="Print REPORT with the EntMLM-masked words in [brackets] and its tagged "
                                      "entities; with an image, also write a PNG of the image, its AttMIM "
                                      "score heat map and the chosen mask.",
                          epilog="Without --checkpoint the scores come from an untrained model of --method.")
    mask.add_argument("--report", default=None, help="report text (or --report-file; default: the sample's report)")
    mask.add_argument("--report-file", default=None, help="file holding the report text")
    mask.add_argument("--image", default=None, help="image file (DICOM, JPG, PNG)")
    mask.add_argument("--dataset", default=None, help="take the image (and report) of --sample from this dataset")
    mask.add_argument("--sample", default=None, help="sample id in --dataset (see its split files)")
    mask.add_argument("--checkpoint", default=None, help="a run folder or its final.pt/checkpoint.pt")
    mask.add_argument("--method", default="mmclip", help="method whose switches to use without --checkpoint")
    mask.add_argument("--ablation", default="none")
    mask.add_argument("--out", default="mask.png", help="PNG to write (default: mask.png)")
    mask.add_argument("--seed", type=int, default=0, help="seed of the random parts of the masks")
    mask.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    mask.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides (without --checkpoint)")

    step = sub.add_parser("step-time", help="time one training step of several methods on the same data",
                          description="Median ms per training step (forward, backward, AdamW) of each "
                                      "METHOD[:ABLATION] on real corpus batches, and the ratio to the first.")
    step.add_argument("--methods", default="clip,mmclip", help="comma-separated METHOD[:ABLATION] (default: "
                                                               "clip,mmclip)")
    step.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    step.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. model=base")

    sub.add_parser("list", help="registered methods and their ablations, datasets, protocols",
                   description="Print the registered methods with their ablations, the datasets and the protocols.")
    return p


def _run(args: argparse.Namespace) -> None:
    from bench.config import compose_config
    from bench.pipeline import run_experiment
    from bench.table import build_table

    overrides = list(args.overrides)
    if args.results_dir:
        overrides.append(f"results_dir={args.results_dir}")
    cfg = compose_config(args.method, args.ablation, args.seed, overrides)
    store = run_experiment(cfg, force=args.force)
    if not args.no_table:
        print(build_table(store.records(), "auc"))


def _table(args: argparse.Namespace) -> None:
    from bench.results import ResultsStore
    from bench.table import build_table

    print(build_table(ResultsStore(args.results_dir).records(), args.metric, args.protocol, args.format))


def _data(args: argparse.Namespace) -> None:
    import itertools
    import json
    import os
    from pathlib import Path

    if args.data_verb == "synth":
        from bench.synth import DATASETS, ensure_synthetic

        default = Path(os.environ.get("MEDVLP_BENCH_DATA", "~/.cache/medvlp-bench")) / \
            f"synthetic-{args.size}-{args.seed}"
        root = ensure_synthetic(Path(args.out or default).expanduser(), args.size, args.seed, args.workers)
        for name, (folder, _) in DATASETS.items():
            print(f"{name:<10} {root / folder}")
        return
    from bench.datasets import get_adapter
    from bench.inspection import default_settings, render, summarise, throughput

    adapter = get_adapter(args.dataset)(args.root, default_settings(args.dataset, getattr(args, "settings", [])))
    if args.data_verb == "inspect":
        summary = summarise(adapter, args.strict, args.workers or os.cpu_count() or 1)
        task = adapter.task
        print(json.dumps(summary) if args.json else render(summary, task.kind, task.metric))
        return
    existing = (p for p in adapter.read(with_reports=False)["image_path"] if os.path.exists(p))
    paths = list(itertools.islice(existing, args.limit))
    if not paths:
        raise UserError(f"{args.dataset}: no image files found under {args.root}")
    rates = throughput(paths, args.image_size, 0.5, 0.25, args.cache_dir)
    print(f"{args.dataset}: {len(paths)} images at {args.image_size}px, images/s: "
          f"no cache {rates['decode_every_time']:.0f} | filling the cache {rates['cache_fill']:.0f} | "
          f"from the cache {rates['cache_read']:.0f} ({rates['speedup']:.1f}x)")


def _mask(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    from bench.config import compose_config
    from bench.mask_view import image_view, render_text, text_view
    from bench.pipeline import build_method, load_dataset

    if args.checkpoint:
        path = Path(args.checkpoint)
        run_dir = path if path.is_dir() else path.parent
        weights = path if path.is_file() else next((run_dir / n for n in ("final.pt", "checkpoint.pt")
                                                    if (run_dir / n).exists()), None)
        if not (run_dir / "config.yaml").exists() or weights is None:
            raise UserError(f"{args.checkpoint}: not a run folder (needs config.yaml and final.pt or checkpoint.pt)")
        cfg = OmegaConf.load(run_dir / "config.yaml")
    else:
        cfg = compose_config(args.method, args.ablation, None, args.overrides)
    if "text_masking" not in cfg.method:
        raise UserError(f"method {cfg.method.name} does not mask (no method.text_masking); try --method mmclip")
    report, image = args.report, args.image
    if args.report_file:
        report = Path(args.report_file).read_text()
    if args.dataset:
        if not args.sample:
            raise UserError("--dataset needs --sample ID")
        data = load_dataset(cfg, args.dataset, with_reports=True)
        row = data.manifest[data.manifest["sample_id"] == args.sample]
        if row.empty:
            raise UserError(f"{args.dataset} has no sample {args.sample!r}")
        image = row["image_path"].iloc[0]
        if report is None and "report" in row:
            report = row["report"].iloc[0]
    if not report:
        raise UserError("no report: give --report, --report-file, or a --dataset sample that has one")
    method = build_method(cfg, 0)
    if args.checkpoint:
        method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["model"])
    view = text_view(cfg.method.text_masking, method.tokenizer, report, args.seed)
    if image is not None:
        view.update(image_view(method, cfg, image, report, Path(args.out), args.seed))
    if args.json:
        print(json.dumps(view))
        return
    print(render_text(view))
    if image is not None:
        print(f"{view['masked_patches']} of {view['patches']} patches hidden "
              f"({'by AttMIM score' if view['scored'] else 'at random: no scores'}); wrote {view['png']}")


def _step_time(args: argparse.Namespace) -> None:
    from bench.pipeline import quiet_libraries
    from bench.step_time import render, step_times

    quiet_libraries()
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    overrides = ["runtime.progress=false", *args.overrides]
    print(render(step_times(specs, overrides, args.steps)))


def _list() -> None:
    from bench.config import ablation_names, ablation_parameters
    from bench.datasets import adapter_names, get_adapter
    from bench.evaluation import PROTOCOLS
    from bench.registry import method_names

    print("methods (ablations):")
    for m in method_names():
        patterns = [f"{prefix}-<X> ({key})" for prefix, key in ablation_parameters(m).items()]
        print(f"  {m}: {', '.join(ablation_names(m) + patterns)}")
    print("datasets:")
    for d in adapter_names():
        adapter = get_adapter(d)
        print(f"  {d}: {adapter.description}")
    print("protocols:")
    for name in PROTOCOLS:
        print(f"  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        if args.verb == "run":
            _run(args)
        elif args.verb == "table":
            _table(args)
        elif args.verb == "data":
            _data(args)
        elif args.verb == "mask":
            _mask(args)
        elif args.verb == "step-time":
            _step_time(args)
        elif args.verb == "list":
            _list()
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"bench: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
