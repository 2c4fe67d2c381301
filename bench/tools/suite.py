"""`bench suite`: a named grid of experiments (methods x ablations x pretraining seeds, each followed by every
configured protocol x dataset x label fraction x evaluation seed) run as one resumable chain.

The plan comes from the suite file and the configs alone, never from what is on disk, so every worker started
with the same command sees the same units in the same order and takes its own share (`--worker i/n`). Units
share no step (a random-init baseline is planned once per model), so no step is done twice. What is on disk
only decides what is left of a unit: a run with final.pt is reused, one with checkpoint.pt resumes, a record
that exists is skipped. A kill loses at most the step in flight; the same command continues.
"""
from __future__ import annotations

import argparse
import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from bench.core.errors import TrainingDiverged, UserError
from bench.core.results import RecordKey, ResultsStore
from bench.experiment.config import CONFIG_DIR

SUITE_DIR = CONFIG_DIR / "suite"
SUITE_KEYS = ("runs", "seeds", "overrides", "eval_overrides", "budgets")
BUDGETS = ("equal", "may-differ")  # whether every run of the grid must train under the same budget
GRID_KEYS = ("method", "ablation", "seed")  # the grid sets these; an override of them would fold the grid
PRETRAIN, BASELINE = "pretrain", "random-init"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    runs: tuple[tuple[str, str], ...]  # (method, ablation), in file order
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # for every run: pretraining and evaluation
    eval_overrides: tuple[str, ...]  # eval.* only
    budgets: str = "equal"  # one of BUDGETS


@dataclass(frozen=True)
class Unit:
    """One pretraining run followed by its evaluations, or one untrained model's (random-init) evaluations."""

    kind: str  # PRETRAIN or BASELINE
    method: str
    ablation: str  # a baseline's: that of the first run it is the baseline of
    seed: int
    cfg: DictConfig
    records: tuple[RecordKey, ...]
    run_dir: Path | None  # PRETRAIN only
    worker: int  # 1-based

    @property
    def label(self) -> str:
        return f"{self.kind} {self.method}/{self.ablation} seed {self.seed}"


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A suite file by path, or by name from the package's configs/suite/; its structure checked."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = SUITE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"no suite {name_or_path!r}: not a file and not a named suite; named suites: "
                            f"{', '.join(suite_names())}")
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, YAMLError, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable suite file ({first})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite file is a mapping with keys {', '.join(SUITE_KEYS)}")
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(SUITE_KEYS)}")
    budgets = raw.get("budgets", "equal")
    if budgets not in BUDGETS:
        raise UserError(f"{path}: budgets={budgets!r}: expected one of {', '.join(BUDGETS)}")
    return Suite(path.stem, path, _runs(path, raw.get("runs")), _seeds(path, raw.get("seeds")),
                 tuple(check_overrides(raw.get("overrides", []), f"{path}: overrides")),
                 tuple(check_overrides(raw.get("eval_overrides", []), f"{path}: eval_overrides", eval_only=True)),
                 budgets)


def _runs(path: Path, runs: object) -> tuple[tuple[str, str], ...]:
    from bench.core.registry import METHODS

    example = "e.g. runs: {mmclip: [none, no-attmim], clip: [none]}"
    if not isinstance(runs, dict) or not runs:
        raise UserError(f"{path}: runs must map each method to a list of its ablations, {example}")
    out = []
    for method, ablations in runs.items():
        if method not in METHODS.names():
            raise UserError(f"{path}: unknown method {method!r} in runs; valid methods: {', '.join(METHODS.names())}")
        if not isinstance(ablations, list) or not ablations or not all(isinstance(a, str) for a in ablations):
            raise UserError(f"{path}: runs.{method} must be a non-empty list of ablation names, {example}")
        twice = sorted({a for a in ablations if ablations.count(a) > 1})
        if twice:
            raise UserError(f"{path}: runs.{method} lists {', '.join(twice)} more than once")
        out.extend((method, a) for a in ablations)
    return tuple(out)


def _seeds(path: Path, seeds: object) -> tuple[int, ...]:
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not ok or len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: seeds must be a non-empty list of distinct integers (pretraining seeds), "
                        f"e.g. seeds: [0, 1, 2]; got {seeds!r}")
    return tuple(seeds)


def check_overrides(items: object, where: str, eval_only: bool = False) -> list[str]:
    """key=value items that neither fold the grid (method, ablation, seed) nor, for eval_only, leave `eval`."""
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise UserError(f"{where} must be a list of key=value strings, e.g. [trainer.budget.epochs=2]")
    for item in items:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item:
            raise UserError(f"{where}: malformed override {item!r}: expected key=value (e.g. trainer.budget.epochs=2)")
        if key in GRID_KEYS or key.startswith("ablation/"):
            raise UserError(f"{where}: {item!r} sets {key}, which the suite's grid sets (runs and seeds)")
        if eval_only and not key.startswith("eval."):
            raise UserError(f"{where}: {item!r} is not an eval.* setting; put it under overrides")
    return list(items)


def parse_worker(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UserError(f"--worker {text!r}: expected I/N with 1 <= I <= N, e.g. --worker 2/4")
    return int(m[1]), int(m[2])


def plan(suite: Suite, extra_overrides: Sequence[str] = (), results_dir: str | None = None,
         workers: int = 1) -> list[Unit]:
    """Every unit of the suite in run order: seed by seed, each run followed by its random-init baseline the
    first time that baseline appears. Pretraining runs are dealt to the workers in turn, and so are the
    baselines (apart, or one worker could get every cheap baseline and another every run)."""
    from bench.core.registry import METHODS
    from bench.experiment.config import compose_config
    from bench.experiment.evaluating import Subject, evaluation_plan, random_init_subject
    from bench.experiment.identity import pretrain_hash

    overrides = [*suite.overrides, *suite.eval_overrides,
                 *check_overrides(list(extra_overrides), "the command line's overrides")]
    if results_dir is not None:
        overrides.append(f"results_dir={results_dir}")
    units: list[Unit] = []
    baseline_worker: dict[Subject, int] = {}
    seen_baselines: set[tuple[RecordKey, ...]] = set()
    composed: dict[tuple[str, str], DictConfig] = {}
    n_runs = 0
    for seed in suite.seeds:
        for method, ablation in suite.runs:
            if (method, ablation) not in composed:  # composing is most of a dry run's time; seeds share it
                try:
                    composed[method, ablation] = compose_config(method, ablation, None, overrides)
                except UserError as exc:
                    raise UserError(f"{suite.path}: {method}/{ablation}: {exc}") from None
                if suite.budgets == "equal":
                    _check_budget(suite, composed)
            cfg = copy.deepcopy(composed[method, ablation])
            cfg.seed = seed
            store = ResultsStore(cfg.results_dir)
            joint = METHODS.get(method).has_joint_space(cfg)
            phash = pretrain_hash(cfg)
            records = evaluation_plan(cfg, Subject(method, ablation, phash, seed, None, ""), joint)
            units.append(Unit(PRETRAIN, method, ablation, seed, cfg, tuple(records),
                              store.run_dir(method, ablation, phash, seed), n_runs % workers + 1))
            n_runs += 1
            if not cfg.eval.random_init_baseline:
                continue
            subject = random_init_subject(cfg)
            records = tuple(evaluation_plan(cfg, subject, joint))
            if records in seen_baselines:
                continue
            seen_baselines.add(records)
            # one model evaluated under two data settings shares records and its feature cache: one worker
            worker = baseline_worker.setdefault(subject, len(baseline_worker) % workers + 1)
            units.append(Unit(BASELINE, method, ablation, seed, cfg, records, None, worker))
    return units


def _check_budget(suite: Suite, composed: dict[tuple[str, str], DictConfig]) -> None:
    """Refuse a grid whose runs would train for different steps or on different paired rows per step: the
    newest run against the first."""
    from bench.experiment.identity import training_budget

    (first, a), (last, b) = next(iter(composed.items())), list(composed.items())[-1]
    budget_a, budget_b = training_budget(a), training_budget(b)
    if budget_a != budget_b:
        differ = sorted(k for k in budget_a if budget_a[k] != budget_b[k])
        raise UserError(f"{suite.path}: {'/'.join(last)} would train under another budget than {'/'.join(first)} "
                        f"(it differs in {', '.join(differ)}: {budget_b[differ[0]]} against {budget_a[differ[0]]}); "
                        f"give every run the same trainer.budget, or set budgets: may-differ in the suite file")


def pretrain_state(unit: Unit) -> str:
    from bench.train.trainer import CHECKPOINT, FINAL

    if unit.run_dir is None:
        return "-"
    if (unit.run_dir / FINAL).exists():
        return "done"
    return "partial" if (unit.run_dir / CHECKPOINT).exists() else "to do"


def records_left(unit: Unit, store: ResultsStore) -> list[RecordKey]:
    return [k for k in unit.records if not store.exists(k)]


def render_plan(suite: Suite, units: list[Unit], store: ResultsStore, workers: int) -> str:
    """One line per unit and the totals, overall and per worker; reads only which files exist."""
    from tabulate import tabulate

    rows, states, left = [], [], []
    for i, unit in enumerate(units, 1):
        states.append(pretrain_state(unit))
        left.append(len(records_left(unit, store)))
        done = len(unit.records) - left[-1]
        rows.append([i, f"{unit.worker}/{workers}", unit.kind, f"{unit.method}/{unit.ablation}", unit.seed,
                     states[-1], f"{done}/{len(unit.records)}"])
    lines = [f"suite {suite.name} ({suite.path}), results in {store.root}",
             tabulate(rows, ["unit", "worker", "kind", "method/ablation", "seed", "pretrain", "records"],
                      tablefmt="plain"), ""]

    def totals(picked: list[int]) -> str:
        runs = [states[i] for i in picked if units[i].kind == PRETRAIN]
        total = sum(len(units[i].records) for i in picked)
        to_do = sum(left[i] for i in picked)
        return (f"{len(picked)} units ({len(runs)} pretraining runs, {len(picked) - len(runs)} random-init "
                f"baselines); pretraining: {runs.count('done')} done, {runs.count('partial')} partial, "
                f"{runs.count('to do')} to do; records: {total - to_do} done, {to_do} to do")

    lines.append(f"total: {totals(list(range(len(units))))}")
    if workers > 1:
        for w in range(1, workers + 1):
            lines.append(f"worker {w}/{workers}: {totals([i for i, u in enumerate(units) if u.worker == w])}")
    return "\n".join(lines)


def run(suite: Suite, units: list[Unit], worker: int = 1, workers: int = 1) -> dict:
    """Run this worker's units in order, each step skipped if finished; one line per unit, a summary at the
    end. A run that diverges is reported and the others go on; the command then fails."""
    from bench.core.progress import QUIET, display_mode
    from bench.experiment.chain import pretrain_and_evaluate
    from bench.experiment.setup import start

    mine = [u for u in units if u.worker == worker]
    who = f"worker {worker}/{workers}" if workers > 1 else "suite"
    # runtime and results_dir overrides apply to the whole suite
    device, store = start(units[0].cfg.runtime, units[0].cfg.results_dir)
    quiet = display_mode(units[0].cfg.runtime.progress) == QUIET  # the units' lines are progress; errors stay
    provenance = {"suite": {"name": suite.name, "file": str(suite.path), "worker": f"{worker}/{workers}"}}
    counts = {"trained": 0, "resumed": 0, "written": 0, "skipped": 0, "finished": 0}
    diverged: list[str] = []
    started = time.perf_counter()
    for pos, unit in enumerate(mine, 1):
        head = f"bench {who}: [{pos}/{len(mine)}] {unit.label}"
        state, left = pretrain_state(unit), records_left(unit, store)
        counts["skipped"] += len(unit.records) - len(left)
        if state in ("done", "-") and not left:
            counts["finished"] += 1
            if not quiet:
                print(f"{head}: finished already", flush=True)
            continue
        try:
            _, summary = pretrain_and_evaluate(unit.cfg, store, device, unit.kind == BASELINE, provenance=provenance)
        except TrainingDiverged as exc:
            diverged.append(f"{unit.label}: {exc}")
            print(f"{head}: training stopped: {exc}", flush=True)
            continue
        missing = records_left(unit, store)
        if missing:  # the plan and the evaluation disagree: "finished" would be a lie
            raise RuntimeError(f"{unit.label}: evaluation left planned records unwritten, e.g. {missing[0]}")
        trained = {"to do": "trained", "partial": "resumed"}.get(state)
        if trained:
            counts[trained] += 1
        step = f"{trained} in {summary['pretrain_s']:.1f} s, " if trained else ""
        counts["written"] += len(summary["written"])
        if not quiet:
            print(f"{head}: {step}{len(summary['written'])} record(s) written in {summary['evaluate_s']:.1f} s "
                  f"({len(unit.records) - len(left)} already there)", flush=True)
    elapsed = time.perf_counter() - started
    if counts["finished"] == len(mine):
        print(f"bench {who}: nothing to do: all {len(mine)} unit(s) were finished ({counts['skipped']} records)")
    else:
        print(f"bench {who}: {len(mine)} unit(s) in {elapsed:.1f} s: {counts['trained']} pretrained, "
              f"{counts['resumed']} resumed, {counts['finished']} finished already; {counts['written']} record(s) "
              f"written, {counts['skipped']} already there")
    if diverged:
        raise TrainingDiverged(f"{len(diverged)} run(s) diverged (the others went on): {'; '.join(diverged)}")
    return counts


def main(args: argparse.Namespace) -> None:
    worker, workers = parse_worker(args.worker)
    suite = load_suite(args.suite)
    units = plan(suite, [*args.overrides, *(["runtime.progress=quiet"] if args.quiet else [])], args.results_dir,
                 workers)
    if args.dry_run:
        print(render_plan(suite, units, ResultsStore(units[0].cfg.results_dir), workers))
        return
    run(suite, units, worker, workers)
