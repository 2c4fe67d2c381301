"""The `bench` command's parser. Building it imports nothing heavy (no torch, pandas or Hydra), so `bench
--help` and `bench VERB --help` answer at once."""
from __future__ import annotations

import argparse

from bench.data.synth import DIFFICULTIES, SIZES

EPILOG = """examples:
  bench run --method clip                         pretrain + evaluate on the synthetic benchmark
  bench run --method clip --ablation fixed-temperature --seed 1 trainer.budget.epochs=2
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
  bench mask --dataset siim --stats --checkpoint results/runs/mmclip-none-0123456789-seed0
  bench profile --methods clip,mmclip --presets tiny --variants trainer,plain
  bench list
"""


QUIET_HELP = ("no progress (runtime.progress=quiet): only warnings, errors and results; by default a bar on a "
              "terminal, else one line per finished step")


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its message


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bench", description="Pretrain, evaluate and compare medical vision-language models on chest X-rays.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    run = sub.add_parser("run", help="pretrain a method (resuming if interrupted) and evaluate it",
                         description="Pretrain METHOD (or resume/reuse its checkpoint), evaluate it with every "
                                     "configured protocol and dataset, write one record per evaluation and "
                                     "print the table. Finished work is skipped on re-runs.",
                         epilog="Trailing key=value items are Hydra overrides, e.g. trainer.budget.epochs=2 model=tiny "
                                "eval.protocols=[zero-shot].")
    run.add_argument("--method", required=True, help="registered method (see `bench list`)")
    run.add_argument("--ablation", default="none", help="one of the method's ablations (default: none)")
    run.add_argument("--seed", type=int, default=None, help="pretraining seed (default: config's seed, 0)")
    run.add_argument("--results-dir", default=None, help="results root (default: ./results)")
    run.add_argument("--force", action="store_true", help="re-run evaluations that already have a record")
    run.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    run.add_argument("--quiet", action="store_true", help=QUIET_HELP)
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
    sweep.add_argument("--quiet", action="store_true", help=QUIET_HELP + "; the study's name stays the same")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides for every trial")

    ev = sub.add_parser("eval", help="evaluate an existing checkpoint (ours, or an open_clip CLIP model)",
                        description="Evaluate CHECKPOINT with the configured (or given) protocols and datasets and "
                                    "write the same records `bench run` writes. CHECKPOINT is one of our run "
                                    "folders (or its final.pt / checkpoint.pt), open_clip:MODEL[:PRETRAINED] "
                                    "(a pretrained tag or a local weights file) or hf-hub:ORG/REPO (online only).",
                        epilog="Trailing key=value items override eval/data/runtime settings, e.g. "
                               "eval.fine_tune.epochs=5 runtime.device=cuda.")
    ev.add_argument("--checkpoint", required=True, metavar="PATH_OR_NAME")
    ev.add_argument("--dataset", action="append", default=[], help="dataset to evaluate on, by every protocol that "
                                                                   "applies (repeatable; default: eval.datasets, "
                                                                   "and a protocol's own datasets)")
    ev.add_argument("--protocol", action="append", default=[], help="zero-shot, linear-probe, fine-tune, "
                                                                    "segmentation or retrieval (repeatable; default: "
                                                                    "eval.protocols)")
    ev.add_argument("--fractions", default=None, help="label fractions of every protocol, e.g. 0.01,0.1,1 (default: "
                                                      "eval.fractions; fine-tuning: eval.fine_tune.fractions)")
    ev.add_argument("--seeds", default=None, help="evaluation seeds, e.g. 0,1,2 (default: eval.seeds)")
    ev.add_argument("--open-clip-config", default=None, help="an open_clip model config JSON for a custom MODEL")
    ev.add_argument("--results-dir", default=None, help="results root (default: ./results)")
    ev.add_argument("--force", action="store_true", help="re-run evaluations that already have a record")
    ev.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="overrides")

    export = sub.add_parser(
        "export", help="write a finished run as a self-contained model folder (safetensors, config, tokenizer, card)",
        description="Write RUN_DIR's final weights as a folder that loads with no results folder, no config tree and "
                    "no network: model.safetensors, config.json (method, preset, embedding size, preprocessing, "
                    "provenance), the tokenizer's files, cost.json and a model card (README.md) with the run's "
                    "evaluation tables. bench.load_model(DIR) and `bench eval --checkpoint DIR` read it; the folder "
                    "has the Hugging Face hub's layout, so it uploads as it is.",
        epilog="examples: bench export results/runs/mmclip-none-0123456789-seed0 --out exports/mmclip; then in "
               "Python: from bench import MMCLIPModel; MMCLIPModel.from_pretrained('exports/mmclip')")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (results/runs/...) or its final.pt")
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")

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
    suite.add_argument("--quiet", action="store_true", help=QUIET_HELP + " (the summary stays)")
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
    table.add_argument("--seeds", default=None, help="only models of these pretraining seeds, e.g. 0 or 0,1")
    table.add_argument("--methods", default=None,
                       help="comma-separated METHOD[:ABLATION] rows, in row order (their random-init baseline "
                            "stays)")
    table.add_argument("--delta-to", default=None, metavar="METHOD[:ABLATION]",
                       help="show every other row as its change from this row, with a paired significance test")
    table.add_argument("--test", default="bootstrap", choices=["bootstrap", "delong"],
                       help="paired test for --delta-to: bootstrap over stored replicates (default) or DeLong "
                            "on stored predictions (AUC only)")
    table.add_argument("--cost", action="store_true",
                       help="add what each row's pretraining cost: optimiser steps, samples seen of each kind, "
                            "model GFLOPs per step and in all (the records' `cost`)")
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
                                      "per row from the stored predictions), `masks` (segmentation: test images with "
                                      "true and predicted masks), or `all`. Prints the paths written.")
    plot.add_argument("--kind", default="all", choices=["bars", "fractions", "roc", "masks", "all"])
    plot.add_argument("--metric", default="auc", help="metric for bars and fractions (default: auc)")
    plot.add_argument("--protocol", default=None, help="only this protocol")
    plot.add_argument("--fraction", default=None, help="only this label fraction (e.g. 0.1 or 10%%)")
    plot.add_argument("--datasets", default=None, help="comma-separated datasets")
    plot.add_argument("--seeds", default=None, help="only models of these pretraining seeds, e.g. 0 or 0,1")
    plot.add_argument("--methods", default=None, help="comma-separated METHOD[:ABLATION] rows")
    plot.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    plot.add_argument("--out", default=None, metavar="DIR", help="folder for the figures (default: "
                                                                  "<results-dir>/plots)")

    report = sub.add_parser(
        "report", help="one self-contained HTML page: every table, the figures, sweeps and provenance",
        description="Write one HTML page that reads offline (no script, styles inline, figures as data URIs): per "
                    "protocol and label fraction the table `bench table` prints (mean±std (n), CIs with --ci, "
                    "significance markers with --delta-to, the best in bold) with its figures, each sweep's "
                    "best.json, trials and plots, and every record's provenance on demand. Prints the path written.",
        epilog="examples: bench report; bench report --delta-to mmclip --ci --out paper/report.html; "
               "bench report --metric f1,segmentation=iou")
    report.add_argument("--metric", default="auc", metavar="METRIC[,PROTOCOL=METRIC...]",
                        help="the metric of every protocol whose records hold it (default: auc); a protocol without "
                             "it shows its headline metrics (segmentation: dice; retrieval: R@K / P@K at the smallest "
                             "K); PROTOCOL=METRIC chooses one protocol's")
    report.add_argument("--delta-to", default=None, metavar="METHOD[:ABLATION]",
                        help="show every other row as its change from this row, with a paired significance test "
                             "(bootstrap), in the tables where the row has records")
    report.add_argument("--ci", action="store_true",
                        help="append the CI of the seed mean (two-level bootstrap over seeds and test resamples)")
    report.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    report.add_argument("--out", default=None, metavar="FILE", help="the page (default: <results-dir>/report.html)")

    data = sub.add_parser("data", help="generate the synthetic benchmark; inspect a dataset root",
                          description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic benchmark (all six datasets, real layouts)",
                                description="Write the built-in synthetic benchmark: MIMIC-CXR-JPG, CheXpert, "
                                            "RSNA, SIIM-ACR, COVIDx and NIH ChestX-ray14 in their real on-disk "
                                            "formats. Deterministic by seed; an existing complete copy is kept.")
    synth.add_argument("--out", default=None, help="folder to write (default: the configured synthetic root)")
    synth.add_argument("--size", default="small", choices=SIZES)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--difficulty", default="standard", choices=DIFFICULTIES,
                       help="how conspicuous findings are against the nuisance variation (default: standard)")
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
                                      "score heat map and the chosen mask. With --dataset D --stats, measure "
                                      "AttMIM's hit rate (the share of hidden patches on a finding), the share "
                                      "of patches on a finding (random masking's expected hit rate) and their "
                                      "ratio, the lift, over D's images with ground-truth finding masks.",
                          epilog="Without --checkpoint the scores come from an untrained model of --method. "
                                 "--stats pairs each image with --report, else its own report, else the prompt "
                                 "written from its labels.")
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
    mask.add_argument("--stats", action="store_true",
                      help="with --dataset: hit rate, finding share and lift of AttMIM over the split's images "
                           "that have ground-truth finding masks")
    mask.add_argument("--split", default="test", choices=["test", "val", "train"], help="--stats split (default: test)")
    mask.add_argument("--limit", type=positive_int, default=None,
                      help="--stats: the first N images with ground truth (default: all)")
    mask.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides (without --checkpoint)")

    profile = sub.add_parser(
        "profile", help="training speed, memory and MFU of methods on synthetic tensors and real files",
        description="Time training steps of each METHOD[:ABLATION] x preset x input x variant and print one JSON "
                    "line per configuration: median step time after warm-up (synchronised), images/s, peak "
                    "memory, model FLOPs per step, and on GPU the MFU against the measured and the vendor's bf16 "
                    "peak. A table for people follows on stderr.",
        epilog="Trailing key=value items are Hydra overrides for every configuration, e.g. "
               "runtime.speed.compile=false trainer.precision=fp32.")
    profile.add_argument("--methods", default="clip,mrm,mmclip,mlip",
                         help="comma-separated METHOD[:ABLATION], or `all` (clip, mrm, and mmclip and mlip with "
                              "every ablation); the table gives each step's cost relative to clip's")
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
