"""What each verb of the `bench` command does. A verb imports what it uses when it runs
(scripts/cli_startup.py measures it)."""
from __future__ import annotations

import argparse
import sys

from bench.core.errors import UserError

QUIET_OVERRIDE = "runtime.progress=quiet"  # what --quiet sets


def verb_run(args: argparse.Namespace) -> None:
    from bench.experiment.chain import run_experiment
    from bench.experiment.config import compose_config
    from bench.report.table import build_table
    from bench.train.distributed import is_main

    overrides = list(args.overrides)
    if args.results_dir:
        overrides.append(f"results_dir={args.results_dir}")
    if args.quiet:
        overrides.append(QUIET_OVERRIDE)
    cfg = compose_config(args.method, args.ablation, args.seed, overrides)
    store = run_experiment(cfg, force=args.force)
    if not args.no_table and is_main():
        # all labels, and the fractions of any protocol that has no 100% record (the demo fine-tunes at 10%);
        # `bench table --fraction 0.01` shows the other label-efficiency columns
        records = store.records()
        at_all = {r["protocol"] for r in records if r["fraction"] == 1.0}
        fractions = sorted({1.0} & {r["fraction"] for r in records} |
                           {r["fraction"] for r in records if r["protocol"] not in at_all}, reverse=True)
        print("\n\n".join(build_table(records, "auc", fraction=f) for f in fractions or [None]))


def seed_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def fraction_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated label fractions, e.g. 0.01,0.1,1") from None


def verb_sweep(args: argparse.Namespace) -> None:
    from bench.core.registry import PROTOCOLS
    from bench.experiment.config import compose_config
    from bench.tools.sweep.spec import Objective, SweepSpec, parse_param
    from bench.tools.sweep.study import finalize, run_sweep

    overrides = list(args.overrides)
    base = compose_config(args.method, args.ablation, None, overrides)
    spec = SweepSpec(args.method, args.ablation, [parse_param(p, base) for p in args.param],
                     Objective.parse(args.objective, lambda p: PROTOCOLS.get(p).datasets(base)),
                     seed_list(args.seeds, "--seeds"), overrides, args.trials, args.sampler, args.pruner, args.sampler_seed, args.results_dir,
                     args.study_name, args.storage, progress="quiet" if args.quiet else None)
    if args.finalize:
        seeds = seed_list(args.final_seeds, "--final-seeds") if args.final_seeds else spec.seeds
        written = finalize(spec, seeds, args.force)
        print(f"bench: {len(written)} record(s) of {args.method}/sweep-{spec.study_name} written", file=sys.stderr)
        return
    summary = run_sweep(spec)
    print(f"bench: study {spec.study_name}: ran {summary['ran']} trial(s) here; outputs in {spec.folder}",
          file=sys.stderr)
    best = spec.folder / "best.json"
    if best.exists():
        print(best.read_text().strip())


def verb_eval(args: argparse.Namespace) -> None:
    from bench.core.progress import QUIET, display_mode
    from bench.experiment.checkpoints import load_checkpoint
    from bench.experiment.evaluating import evaluate, report_timing
    from bench.experiment.setup import quiet_libraries, start

    quiet_libraries()  # before the model is built: transformers speaks while it builds
    from bench.core.registry import PROTOCOLS

    overrides = list(args.overrides)
    for flag, key in ((args.dataset, "eval.datasets"), (args.protocol, "eval.protocols")):
        items = [x for item in flag for x in item.split(",") if x]
        if items:
            overrides.append(f"{key}=[{','.join(items)}]")
            if key == "eval.datasets":  # every protocol's: a protocol's own `datasets` (retrieval's) gives way
                overrides += [f"eval.{cls.section()}.datasets=null" for cls in PROTOCOLS.classes()
                              if "datasets" in cls.defaults]
    if args.fractions:  # every protocol's: a protocol's own `fractions` (fine-tuning's demo default) gives way
        overrides.append(f"eval.fractions=[{','.join(map(str, fraction_list(args.fractions, '--fractions')))}]")
        overrides += [f"eval.{cls.section()}.fractions=null" for cls in PROTOCOLS.classes()
                      if "fractions" in cls.defaults]
    if args.seeds:
        overrides.append(f"eval.seeds=[{','.join(map(str, seed_list(args.seeds, '--seeds')))}]")
    if args.results_dir:
        overrides.append(f"results_dir={args.results_dir}")
    if args.quiet:
        overrides.append(QUIET_OVERRIDE)
    cfg, method, subject = load_checkpoint(args.checkpoint, overrides, args.open_clip_config)
    device, store = start(cfg.runtime, cfg.results_dir)
    summary = evaluate(cfg, method.to(device), subject, store, device, args.force)
    report_timing(subject, summary, quiet=display_mode(cfg.runtime.progress) == QUIET)
    for path in summary["written"]:
        print(path)


def verb_export(args: argparse.Namespace) -> None:
    from bench.tools.export import export_run
    from bench.experiment.setup import quiet_libraries

    quiet_libraries()
    print(export_run(args.run_dir, args.out))


def verb_table(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bench.core.results import ResultsStore
    from bench.report.selection import keep_pretrain_seeds
    from bench.report.table import build_table

    records = keep_pretrain_seeds(ResultsStore(args.results_dir).records(), args.seeds)
    text = build_table(records, args.metric, args.protocol, args.format,
                       fraction=args.fraction, datasets=args.datasets, methods=args.methods,
                       delta_to=args.delta_to, test=args.test, ci=args.ci, prompt_set=args.prompt_set,
                       reference=args.reference, cost=args.cost)
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
        print(out)
    else:
        print(text)


def verb_plot(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bench.core.results import ResultsStore
    from bench.report.plots import write_plots
    from bench.report.selection import keep_pretrain_seeds

    out = Path(args.out).expanduser() if args.out else Path(args.results_dir) / "plots"
    records = keep_pretrain_seeds(ResultsStore(args.results_dir).records(), args.seeds)
    for path in write_plots(records, args.kind, out, metric=args.metric,
                            protocol=args.protocol, fraction=args.fraction, datasets=args.datasets,
                            methods=args.methods):
        print(path)


def verb_report(args: argparse.Namespace) -> None:
    from bench.report.html import write_report

    print(write_report(args.results_dir, args.out, args.metric, args.delta_to, args.ci))


def verb_data(args: argparse.Namespace) -> None:
    import itertools
    import json
    import os
    from pathlib import Path

    if args.data_verb == "synth":
        from bench.data.synth import ensure_synthetic, folder_name, synthetic_adapters

        default = Path(os.environ.get("MEDVLP_BENCH_DATA", "~/.cache/medvlp-bench")) / \
            folder_name(args.size, args.seed, args.difficulty)
        root = ensure_synthetic(Path(args.out or default).expanduser(), args.size, args.seed, args.workers,
                                args.difficulty)
        for adapter in synthetic_adapters():
            print(f"{adapter.name:<10} {root / adapter.synthetic.folder}")
        return
    from bench.core.registry import DATASETS
    from bench.tools.inspection import default_settings, render, summarise, throughput

    adapter = DATASETS.get(args.dataset)(args.root, default_settings(args.dataset, getattr(args, "settings", [])))
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


def verb_mask(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from bench.experiment.config import compose_config

    if args.checkpoint:
        from bench.experiment.checkpoints import run_folder

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
    if args.stats:
        _mask_stats(args, cfg, report, weights if args.checkpoint else None)
        return
    if args.dataset:
        from bench.data.loading import load_dataset

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

        from bench.experiment.pretraining import build_method
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


def _mask_stats(args: argparse.Namespace, cfg, report: str | None, weights) -> None:
    """`bench mask --dataset D --stats`: AttMIM's hit rate, finding share and lift (bench/tools/hit_rate.py)."""
    import json

    import torch

    from bench.core.registry import DATASETS
    from bench.experiment.pretraining import build_method
    from bench.tools.hit_rate import mask_stats, render_stats

    if not args.dataset:
        raise UserError("--stats needs --dataset D: the images whose ground-truth finding masks it measures against")
    if args.sample or args.image:
        raise UserError("--stats measures a whole split: leave out --sample and --image (or --stats)")
    DATASETS.get(args.dataset)  # an unknown name is one line listing the datasets, before any model is built
    method = build_method(cfg, 0)
    if weights is not None:
        method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["model"])
    model = f"{cfg.method.name} from {weights}" if weights is not None else \
        f"untrained {cfg.method.name} (no --checkpoint: random weights, seed 0)"
    stats = mask_stats(cfg, method, args.dataset, args.split, args.limit, report, args.seed, model)
    print(json.dumps(stats) if args.json else render_stats(stats))


def verb_profile(args: argparse.Namespace) -> None:
    from bench.tools.profile.command import main as profile_main

    profile_main(args)


def verb_suite(args: argparse.Namespace) -> None:
    from bench.tools.suite import main as suite_main

    suite_main(args)


def verb_list(args: argparse.Namespace) -> None:
    from bench.core.registry import DATASETS, METHODS, PROTOCOLS
    from bench.evaluation.prompt_sets import get_prompt_set, prompt_set_names
    from bench.experiment.config import ablation_catalogue, ablation_note

    print("methods (ablations; the keys each changes in the method's config, and what follows from it):")
    for m, (named, parameters, table) in ablation_catalogue(METHODS.names(), changes=True).items():
        patterns = [f"{prefix}-<X> ({key})" for prefix, key in parameters.items()]
        print(f"  {m}: {', '.join(named + patterns)}")
        for ablation, changes in table.items():
            print(f"    {ablation}: " + ", ".join(f"{key} {_shown(old)} -> {_shown(new)}"
                                                 for key, (old, new) in changes.items()))
            note = ablation_note(m, ablation)
            if note:
                print(f"      follows: {note}")
    print("datasets:")
    for d in DATASETS.names():
        adapter = DATASETS.get(d)
        print(f"  {d}: {adapter.description}")
    print("protocols:")
    for name in PROTOCOLS.names():
        print(f"  {name}")
    print("zero-shot prompt sets:")
    for name in prompt_set_names():
        prompt_set = get_prompt_set(name)
        negatives = any(c.negative for c in prompt_set.classes.values())
        print(f"  {prompt_set.id}: {len(prompt_set.classes)} classes, positive{' and negative' * negatives} prompts "
              f"({prompt_set.path.name})")


def _shown(value) -> str:
    """A config value as YAML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)
