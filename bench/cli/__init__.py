"""The `bench` command line. Flags for what users type most, Hydra overrides (key=value) for the rest.

Building the parser imports nothing heavy (no torch, pandas or Hydra), so `bench --help`, `bench VERB --help` and
`bench list` answer at once; each verb imports what it uses when it runs (scripts/cli_startup.py measures it).
"""
from __future__ import annotations

import argparse
import errno
import sys

from bench.core.errors import TrainingDiverged, UserError

EPILOG = """examples:
  bench run --method clip                         pretrain + evaluate on the synthetic benchmark
  bench run --method clip --ablation fixed-temperature --seed 1 trainer.epochs=2
  bench run --method clip data.mimic-cxr.root=/data/mimic-cxr-jpg/2.0.0 \\
            data.chexpert.root=/data/CheXpert-v1.0-small model=base
  bench table --metric auc
  bench eval --checkpoint results/runs/clip-none-0123456789-seed0 --dataset rsna --protocol linear-probe
  bench data synth --size tiny --out /tmp/synthetic
  bench data inspect chexpert --root /data/CheXpert-v1.0-small --json --set uncertain_policy=ones
  bench run --method mmclip --ablation no-attmim
  bench run --method mmclip --ablation attmim-share-0.5
  bench sweep --method mmclip --param mask_ratio=0.3:0.9 --trials 20 --objective rsna:linear-probe:auc
  bench mask --report "Small right pleural effusion. No pneumothorax." --json
  bench profile --methods clip,mmclip --presets tiny --variants trainer,plain
  bench list
"""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its message


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
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

    sweep = sub.add_parser(
        "sweep", help="Optuna search over settings, scored on validation splits (test sealed); --finalize",
        description="Search settings of METHOD with Optuna. Each trial pretrains with its sampled values (once per "
                    "--seeds seed) and scores --objective on the validation splits; the test split cannot be read "
                    "during a sweep. The study lives in --storage, so re-running the same command resumes it "
                    "(only missing trials run) and several workers started with it share it. Writes best.json, "
                    "trials.csv and plots to <results-dir>/sweeps/<study>/. --finalize retrains the best "
                    "configuration with --final-seeds and evaluates it on test like `bench run`, as the ablation "
                    "sweep-<study>.",
        epilog="examples: bench sweep --method mmclip --param mask_ratio=0.3:0.9 --trials 20; "
               "bench sweep --method mmclip --param lr=1e-4:1e-2:log --param mask_ratio=0.5,0.75 "
               "--objective rsna,chexpert:linear-probe:auc --seeds 0,1 --storage postgresql://host/db; "
               "bench sweep --method mmclip --param mask_ratio=0.3:0.9 --trials 20 --finalize --final-seeds 0,1,2")
    sweep.add_argument("--method", required=True)
    sweep.add_argument("--ablation", default="none", help="the ablation whose settings the search starts from")
    sweep.add_argument("--param", action="append", default=[], metavar="NAME=LOW:HIGH[:log|:int] | NAME=a,b,c",
                       help="a searched setting (repeatable): a config key or its unique ending, e.g. mask_ratio")
    sweep.add_argument("--trials", type=positive_int, default=20, help="trials the study should hold (default 20)")
    sweep.add_argument("--objective", default="linear-probe:auc", metavar="[DATASETS:]PROTOCOL:METRIC[:FRACTION]",
                       help="maximised on validation: the metric's mean over the datasets (default: every "
                            "eval.datasets dataset, linear-probe:auc)")
    sweep.add_argument("--seeds", default="0", help="pretraining seeds a trial averages over (default 0)")
    sweep.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"])
    sweep.add_argument("--sampler-seed", type=int, default=0)
    sweep.add_argument("--pruner", default="median", choices=["median", "none"],
                       help="median: stop a trial whose validation value after an epoch is below the median of "
                            "earlier trials at that epoch")
    sweep.add_argument("--storage", default=None, help="Optuna storage: an RDB URL (postgresql://, mysql://, "
                                                       "sqlite:///) or a journal file (default: "
                                                       "<results-dir>/sweeps/<study>/study.journal)")
    sweep.add_argument("--study-name", default=None, help="default: METHOD-ABLATION-<hash of the search>")
    sweep.add_argument("--results-dir", default="results")
    sweep.add_argument("--finalize", action="store_true",
                       help="retrain the best trial's configuration and evaluate it on test")
    sweep.add_argument("--final-seeds", default=None, help="pretraining seeds of --finalize (default: --seeds)")
    sweep.add_argument("--force", action="store_true", help="--finalize: re-run evaluations that have a record")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides for every trial")

    ev = sub.add_parser("eval", help="evaluate an existing checkpoint (ours, or an open_clip CLIP model)",
                        description="Evaluate CHECKPOINT with the configured (or given) protocols and datasets and "
                                    "write the same records `bench run` writes. CHECKPOINT is one of our run "
                                    "folders (or its final.pt / checkpoint.pt), open_clip:MODEL[:PRETRAINED] "
                                    "(a pretrained tag or a local weights file) or hf-hub:ORG/REPO (online only).",
                        epilog="Trailing key=value items override eval/data/runtime settings, e.g. "
                               "eval.fine_tune.epochs=5 runtime.device=cuda.")
    ev.add_argument("--checkpoint", required=True, metavar="PATH_OR_NAME")
    ev.add_argument("--dataset", action="append", default=[], help="dataset to evaluate on (repeatable; default: "
                                                                   "eval.datasets)")
    ev.add_argument("--protocol", action="append", default=[], help="zero-shot, linear-probe or fine-tune "
                                                                    "(repeatable; default: eval.protocols)")
    ev.add_argument("--fractions", default=None, help="label fractions, e.g. 0.01,0.1,1 (default: eval.fractions)")
    ev.add_argument("--seeds", default=None, help="evaluation seeds, e.g. 0,1,2 (default: eval.seeds)")
    ev.add_argument("--open-clip-config", default=None, help="an open_clip model config JSON for a custom MODEL")
    ev.add_argument("--results-dir", default=None, help="results root (default: ./results)")
    ev.add_argument("--force", action="store_true", help="re-run evaluations that already have a record")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="overrides")

    suite = sub.add_parser(
        "suite", help="run a grid of experiments from a suite file (resumable, splittable across workers)",
        description="Pretrain and evaluate every run of a suite (configs/suite/NAME.yaml or a path): methods x "
                    "ablations x pretraining seeds, each evaluated with every configured protocol, dataset, label "
                    "fraction and evaluation seed, plus each distinct random-init baseline once. Finished steps "
                    "are skipped, so re-running the same command after a kill continues where it stopped.",
        epilog="examples: bench suite ablations --dry-run; bench suite ablations --worker 2/4 "
               "--results-dir /shared/results; bench suite smoke runtime.threads=1")
    suite.add_argument("suite", metavar="NAME_OR_PATH", help="a named suite (configs/suite/) or a suite YAML file")
    suite.add_argument("--worker", default="1/1", metavar="I/N",
                       help="run only the I-th of N shares of the units; start all N with the same command and "
                            "results folder (default: 1/1)")
    suite.add_argument("--dry-run", action="store_true", help="print the plan and what is left; train nothing")
    suite.add_argument("--results-dir", default=None, metavar="DIR", help="results root (default: ./results)")
    suite.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides for every run")

    table = sub.add_parser("table", help="aggregate records into a table (mean±std over seeds, CIs, tests)",
                           description="Rows: method/ablation (a variant column where one has several "
                                       "configurations: never pooled); columns: dataset (x protocol x label "
                                       "fraction where several are present); cells: mean±std (n) over seeds; the "
                                       "best per column in bold. Cells without a value say `missing`.",
                           epilog="examples: bench table --metric auc --protocol linear-probe --ci; "
                                  "bench table --delta-to mmclip --test delong --datasets chexpert,rsna; "
                                  "bench table --reference published.yaml --format latex --out table.tex")
    table.add_argument("--metric", default="auc", help="metric to show, e.g. auc, acc, f1, mcc (default: auc)")
    table.add_argument("--protocol", default=None, help="only this protocol (e.g. zero-shot, linear-probe)")
    table.add_argument("--fraction", default=None, help="only this label fraction (e.g. 0.1 or 10%%)")
    table.add_argument("--datasets", default=None, help="comma-separated datasets, in column order")
    table.add_argument("--methods", default=None,
                       help="comma-separated METHOD[:ABLATION] rows, in row order (their random-init baseline "
                            "stays)")
    table.add_argument("--delta-to", default=None, metavar="METHOD[:ABLATION]",
                       help="show every other row as its change from this row, with a paired significance test")
    table.add_argument("--test", default="bootstrap", choices=["bootstrap", "delong"],
                       help="paired test for --delta-to: bootstrap over stored replicates (default) or DeLong "
                            "on stored predictions (AUC only)")
    table.add_argument("--ci", action="store_true",
                       help="append the CI of the seed mean (two-level bootstrap over seeds and test resamples)")
    table.add_argument("--prompt-set", default=None, metavar="NAME",
                       help="zero-shot cells from this prompt set (e.g. gloria or gloria@v1) instead of the primary")
    table.add_argument("--reference", default=None, metavar="FILE",
                       help="YAML or CSV of published numbers (method, [ablation,] dataset, protocol, [fraction,] "
                            "metric, value, [std, source]) shown as quoted rows")
    table.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "json"])
    table.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    table.add_argument("--out", default=None, metavar="FILE", help="write the table to FILE instead of stdout")

    plot = sub.add_parser("plot", help="figures: bars with CIs, label-efficiency curves, ROC curves",
                          description="Write PNG and PDF figures from the records: `bars` (seed mean per row with "
                                      "CI whiskers, one panel per dataset, one figure per protocol and fraction), "
                                      "`fractions` (metric vs label fraction per row), `roc` (macro-average ROC "
                                      "per row from the stored predictions), or `all`. Prints the paths written.")
    plot.add_argument("--kind", default="all", choices=["bars", "fractions", "roc", "all"])
    plot.add_argument("--metric", default="auc", help="metric for bars and fractions (default: auc)")
    plot.add_argument("--protocol", default=None, help="only this protocol")
    plot.add_argument("--fraction", default=None, help="only this label fraction (e.g. 0.1 or 10%%)")
    plot.add_argument("--datasets", default=None, help="comma-separated datasets")
    plot.add_argument("--methods", default=None, help="comma-separated METHOD[:ABLATION] rows")
    plot.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    plot.add_argument("--out", default=None, metavar="DIR", help="folder for the figures (default: "
                                                                  "<results-dir>/plots)")

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
    synth.add_argument("--workers", type=positive_int, default=None, help="drawing processes (default: up to 4)")
    inspect = data_sub.add_parser("inspect", help="summarise a dataset root from its metadata files",
                                  description="Build DATASET's manifest from the metadata under --root and "
                                              "report samples, patients, splits, label counts and missing "
                                              "image files.")
    inspect.add_argument("dataset", help="adapter name (see `bench list`)")
    inspect.add_argument("--root", required=True, help="the dataset folder, as downloaded")
    inspect.add_argument("--json", action="store_true", help="print exactly one JSON object")
    inspect.add_argument("--strict", action="store_true",
                         help="missing or unreadable images are an error (decodes every image)")
    inspect.add_argument("--workers", type=positive_int, default=None,
                         help="decoding processes for --strict (default: all cores)")
    inspect.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                         help="a dataset option, e.g. --set uncertain_policy=ones (repeatable)")
    speed = data_sub.add_parser("throughput", help="images/s with and without the preprocessed-image cache",
                                description="Time decode+resize+normalise per image on DATASET's images: "
                                            "without the cache, filling it, and reading it.")
    speed.add_argument("dataset")
    speed.add_argument("--root", required=True)
    speed.add_argument("--image-size", type=positive_int, default=224)
    speed.add_argument("--limit", type=positive_int, default=500, help="images to time (default 500)")
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

    profile = sub.add_parser(
        "profile", help="training speed, memory and MFU of methods on synthetic tensors and real files",
        description="Time training steps of each METHOD[:ABLATION] x preset x input x variant and print one JSON "
                    "line per configuration: median step time after warm-up (synchronised), images/s, peak "
                    "memory, model FLOPs per step, and on GPU the MFU against the measured and the vendor's bf16 "
                    "peak. A table for people follows on stderr.",
        epilog="Trailing key=value items are Hydra overrides for every configuration, e.g. "
               "runtime.speed.compile=false trainer.precision=fp32.")
    profile.add_argument("--methods", default="clip,mrm,mmclip",
                         help="comma-separated METHOD[:ABLATION], or `all` (clip, mrm, mmclip and every mmclip "
                              "ablation)")
    profile.add_argument("--presets", default=None,
                         help="model presets, comma-separated (default: base on GPU, tiny on CPU)")
    profile.add_argument("--inputs", default="synthetic,files",
                         help="synthetic (tensors in memory), files (the corpus on disk through the loader); "
                              "default both")
    profile.add_argument("--variants", default="trainer",
                         help="trainer (the trainer with runtime.speed), plain (an fp32 eager loop); "
                              "comma-separated, taking turns step by step")
    profile.add_argument("--batch-size", type=positive_int, default=None,
                         help="trainer.batch_size (default: the config's)")
    profile.add_argument("--steps", type=positive_int, default=20, help="timed steps per configuration (default 20)")
    profile.add_argument("--warmup", type=int, default=5,
                         help="untimed steps first (default 5; compilation happens here)")
    profile.add_argument("--loader-batches", type=int, default=20,
                         help="batches timed from the loader alone with --inputs files (default 20; 0 = skip)")
    profile.add_argument("--workers", type=int, default=None, help="loader workers (default: runtime.num_workers)")
    profile.add_argument("--out", default=None, help="also append the JSON lines to this file")
    profile.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides for every configuration")

    sub.add_parser("list", help="registered methods and their ablations, datasets, protocols, prompt sets",
                   description="Print the registered methods with their ablations, the datasets, the protocols "
                               "and the zero-shot prompt sets.")
    return p


def _run(args: argparse.Namespace) -> None:
    from bench.experiment.chain import run_experiment
    from bench.experiment.config import compose_config
    from bench.report.table import build_table
    from bench.train.distributed import is_main

    overrides = list(args.overrides)
    if args.results_dir:
        overrides.append(f"results_dir={args.results_dir}")
    cfg = compose_config(args.method, args.ablation, args.seed, overrides)
    store = run_experiment(cfg, force=args.force)
    if not args.no_table and is_main():  # all labels; `bench table --fraction 0.01` shows the label-efficiency columns
        records = store.records()
        print(build_table(records, "auc", fraction=1.0 if any(r["fraction"] == 1.0 for r in records) else None))


def _seed_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _fraction_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated label fractions, e.g. 0.01,0.1,1") from None


def _sweep(args: argparse.Namespace) -> None:
    from bench.experiment.config import compose_config
    from bench.tools.sweep import Objective, SweepSpec, finalize, parse_param, run_sweep

    overrides = list(args.overrides)
    base = compose_config(args.method, args.ablation, None, overrides)
    spec = SweepSpec(args.method, args.ablation, [parse_param(p, base) for p in args.param],
                     Objective.parse(args.objective, list(base.eval.datasets)), _seed_list(args.seeds, "--seeds"),
                     overrides, args.trials, args.sampler, args.pruner, args.sampler_seed, args.results_dir,
                     args.study_name, args.storage)
    if args.finalize:
        seeds = _seed_list(args.final_seeds, "--final-seeds") if args.final_seeds else spec.seeds
        written = finalize(spec, seeds, args.force)
        print(f"bench: {len(written)} record(s) of {args.method}/sweep-{spec.study_name} written", file=sys.stderr)
        return
    summary = run_sweep(spec)
    print(f"bench: study {spec.study_name}: ran {summary['ran']} trial(s) here; outputs in {spec.folder}",
          file=sys.stderr)
    best = spec.folder / "best.json"
    if best.exists():
        print(best.read_text().strip())


def _eval(args: argparse.Namespace) -> None:
    from bench.core.results import ResultsStore
    from bench.experiment.chain import (
        evaluate,
        load_checkpoint,
        quiet_libraries,
        report_timing,
    )
    from bench.train.trainer import resolve_device

    quiet_libraries()
    overrides = list(args.overrides)
    for flag, key in ((args.dataset, "eval.datasets"), (args.protocol, "eval.protocols")):
        items = [x for item in flag for x in item.split(",") if x]
        if items:
            overrides.append(f"{key}=[{','.join(items)}]")
    if args.fractions:
        overrides.append(f"eval.fractions=[{','.join(map(str, _fraction_list(args.fractions, '--fractions')))}]")
    if args.seeds:
        overrides.append(f"eval.seeds=[{','.join(map(str, _seed_list(args.seeds, '--seeds')))}]")
    if args.results_dir:
        overrides.append(f"results_dir={args.results_dir}")
    cfg, method, subject = load_checkpoint(args.checkpoint, overrides, args.open_clip_config)
    store = ResultsStore(cfg.results_dir)
    store.check_writable()
    device = resolve_device(cfg.runtime.device)
    summary = evaluate(cfg, method.to(device), subject, store, device, args.force)
    report_timing(subject, summary)
    for path in summary["written"]:
        print(path)


def _table(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bench.core.results import ResultsStore
    from bench.report.table import build_table

    text = build_table(ResultsStore(args.results_dir).records(), args.metric, args.protocol, args.format,
                       fraction=args.fraction, datasets=args.datasets, methods=args.methods,
                       delta_to=args.delta_to, test=args.test, ci=args.ci, prompt_set=args.prompt_set,
                       reference=args.reference)
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
        print(out)
    else:
        print(text)


def _plot(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bench.core.results import ResultsStore
    from bench.report.plots import write_plots

    out = Path(args.out).expanduser() if args.out else Path(args.results_dir) / "plots"
    for path in write_plots(ResultsStore(args.results_dir).records(), args.kind, out, metric=args.metric,
                            protocol=args.protocol, fraction=args.fraction, datasets=args.datasets,
                            methods=args.methods):
        print(path)


def _data(args: argparse.Namespace) -> None:
    import itertools
    import json
    import os
    from pathlib import Path

    if args.data_verb == "synth":
        from bench.data.synth import DATASETS, ensure_synthetic

        default = Path(os.environ.get("MEDVLP_BENCH_DATA", "~/.cache/medvlp-bench")) / \
            f"synthetic-{args.size}-{args.seed}"
        root = ensure_synthetic(Path(args.out or default).expanduser(), args.size, args.seed, args.workers)
        for name, (folder, _) in DATASETS.items():
            print(f"{name:<10} {root / folder}")
        return
    from bench.datasets import get_adapter
    from bench.tools.inspection import default_settings, render, summarise, throughput

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

    from omegaconf import OmegaConf

    from bench.experiment.config import compose_config

    if args.checkpoint:
        from bench.experiment.chain import run_folder

        if args.overrides:
            raise UserError(f"{args.overrides[0]!r}: overrides apply without --checkpoint only (a checkpoint brings "
                            f"its own settings)")
        run_dir, weights = run_folder(args.checkpoint)
        cfg = OmegaConf.load(run_dir / "config.yaml")
    else:
        cfg = compose_config(args.method, args.ablation, None, args.overrides)
    if "text_masking" not in cfg.method:
        raise UserError(f"method {cfg.method.name} does not mask (no method.text_masking); try --method mmclip")
    report, image = args.report, args.image
    if args.report_file:
        report = Path(args.report_file).read_text()
    if args.dataset:
        from bench.experiment.chain import load_dataset

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
    from bench.modeling.towers import Tokenizer
    from bench.tools.mask_view import render_text, text_view

    if image is None:  # the text's masks need the tokenizer alone, not a model
        view = text_view(cfg.method.text_masking, Tokenizer(cfg.model.text.tokenizer, cfg.model.text.max_length),
                         report, args.seed)
    else:
        import torch

        from bench.experiment.chain import build_method
        from bench.tools.mask_view import image_view

        method = build_method(cfg, 0)
        if args.checkpoint:
            method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["model"])
        view = text_view(cfg.method.text_masking, method.tokenizer, report, args.seed)
        view.update(image_view(method, cfg, image, report, Path(args.out), args.seed))
    if args.json:
        print(json.dumps(view))
        return
    print(render_text(view))
    if image is not None:
        print(f"{view['masked_patches']} of {view['patches']} patches hidden "
              f"({'by AttMIM score' if view['scored'] else 'at random: no scores'}); wrote {view['png']}")


def _profile(args: argparse.Namespace) -> None:
    from bench.tools.profile import main as profile_main

    profile_main(args)


def _suite(args: argparse.Namespace) -> None:
    from bench.tools.suite import main as suite_main

    suite_main(args)


def _list(args: argparse.Namespace) -> None:
    from bench.core.registry import method_names
    from bench.datasets import adapter_names, get_adapter
    from bench.evaluation import PROTOCOLS
    from bench.evaluation.prompt_sets import get_prompt_set, prompt_set_names
    from bench.experiment.config import ablation_catalogue

    print("methods (ablations):")
    for m, (named, parameters) in ablation_catalogue(method_names()).items():
        patterns = [f"{prefix}-<X> ({key})" for prefix, key in parameters.items()]
        print(f"  {m}: {', '.join(named + patterns)}")
    print("datasets:")
    for d in adapter_names():
        adapter = get_adapter(d)
        print(f"  {d}: {adapter.description}")
    print("protocols:")
    for name in PROTOCOLS:
        print(f"  {name}")
    print("zero-shot prompt sets:")
    for name in prompt_set_names():
        prompt_set = get_prompt_set(name)
        negatives = any(c.negative for c in prompt_set.classes.values())
        print(f"  {prompt_set.id}: {len(prompt_set.classes)} classes, positive{' and negative' * negatives} prompts "
              f"({prompt_set.path.name})")


VERBS = {"run": _run, "eval": _eval, "sweep": _sweep, "suite": _suite, "table": _table, "plot": _plot, "data": _data,
         "mask": _mask, "profile": _profile, "list": _list}


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order: argparse takes the overrides up to the first option that
    follows them, and leaves the rest over."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        what = " ".join(unknown or overrides)
        hint = f"`bench {args.verb} --help` lists its options" if args.verb else "`bench --help` lists the verbs"
        parser.exit(2, f"bench: error: unrecognized argument(s): {what} ({hint})\n")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        VERBS[args.verb](args)
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"bench: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # outside the atomic writes (a log, a library's own file): still one line
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            print(f"bench: error: cannot write{where} ({exc.strerror}); what was finished is kept: free space or "
                  f"choose a writable folder and re-run to continue", file=sys.stderr)
        elif exc.errno in (errno.EACCES, errno.EPERM):
            print(f"bench: error:{where or ' a file'}: {exc.strerror}", file=sys.stderr)
        else:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
