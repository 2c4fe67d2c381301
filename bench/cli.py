"""The `bench` command line. Flags for what users type most, Hydra overrides (key=value) for the rest."""
from __future__ import annotations

import argparse
import sys

from bench.errors import TrainingDiverged, UserError

EPILOG = """examples:
  bench run --method clip                         pretrain + evaluate on the synthetic benchmark
  bench run --method clip --ablation fixed-temperature --seed 1 trainer.epochs=2
  bench run --method clip data=real data.pretrain.root=/data/mimic-cxr-jpg/2.0.0 \\
            data.downstream.chexpert.root=/data/CheXpert-v1.0-small model=base
  bench table --metric auc
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


def _list() -> None:
    from bench.config import ablation_names
    from bench.datasets import adapter_names, get_adapter
    from bench.evaluation import PROTOCOLS
    from bench.registry import method_names

    print("methods (ablations):")
    for m in method_names():
        print(f"  {m}: {', '.join(ablation_names(m))}")
    print("datasets:")
    for d in adapter_names():
        task = get_adapter(d).task
        kind = "multi-label" if task.multilabel else "multi-class"
        print(f"  {d}: {len(task.labels)} labels, {kind}, metric {task.metric}")
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
