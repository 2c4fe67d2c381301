"""Hyper-parameter sweeps with Optuna, scored on validation splits only.

A trial composes the method's config with its sampled parameters, pretrains once per `--seeds` seed (the
run lands in the results store like any other, so a killed trial resumes and a repeated configuration is
reused), and scores the objective (a metric of one protocol on one or more datasets) on their validation
splits; the trial's value is the mean over datasets, seeds and evaluation seeds. While a trial pretrains, the
objective is computed after every epoch and reported to Optuna, whose pruner may stop it. The test split is
sealed for the whole sweep (bench.data.splits.sealed): reading it raises. `--finalize` retrains the best
configuration and evaluates it on test like `bench run`, as the ablation `sweep-<study>`.

Studies live in Optuna storage: by default a journal file in `<results>/sweeps/<study>/` (safe for several
processes on one machine), or any RDB URL (PostgreSQL, MySQL, SQLite) for many machines, where heartbeats
return the trials of dead workers. Workers started with the same command share the study: each claims one
trial at a time and stops once the study holds `--trials` finished, running or queued trials, so together
they run exactly that many. A trial whose worker died (or was interrupted) is queued again with the same
parameters and resumes its pretraining from the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.data.splits import sealed
from bench.evaluation import FROZEN, PROTOCOLS, EvalContext, FeatureCache, run_protocol
from bench.evaluation.metrics import METRICS, task_metrics
from bench.experiment.config import compose_config, pretrain_hash, stable_hash, to_plain
from bench.train.speed import loader_workers

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
SCALES = ("float", "log", "int")


@dataclass(frozen=True)
class Param:
    """One searched setting: `key` is the full config key `name` resolved to."""

    name: str
    key: str
    low: float | None = None
    high: float | None = None
    scale: str = "float"  # float | log | int, for ranges
    choices: tuple | None = None  # for lists

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.scale == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.scale == "log")


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def resolve_key(name: str, cfg: DictConfig) -> str:
    """A full config key (`method.image_masking.mask_ratio`) or a unique ending of one (`mask_ratio`)."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in ("runtime", "results_dir", "seed", "ablation")}
    keys = _leaf_keys(plain)
    if name in keys:
        return name
    matches = [k for k in keys if k.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"--param {name}: no such setting in the {cfg.method.name} config (give a key such as "
                        f"method.image_masking.mask_ratio or trainer.lr)")
    raise UserError(f"--param {name} is ambiguous: {', '.join(sorted(matches))}; give the full key")


def parse_param(spec: str, cfg: DictConfig) -> Param:
    """`NAME=LOW:HIGH[:log|:int]` or `NAME=a,b,c`."""
    name, sep, values = spec.partition("=")
    if not sep or not name or not values:
        raise UserError(f"--param {spec!r}: expected NAME=LOW:HIGH[:log|:int] or NAME=a,b,c")
    key = resolve_key(name.strip(), cfg)
    if ":" not in values:
        choices = tuple(_value(v) for v in values.split(",") if v.strip())
        if not choices:
            raise UserError(f"--param {spec!r}: no values")
        return Param(name, key, choices=choices)
    parts = values.split(":")
    scale = parts[2] if len(parts) == 3 else "float"
    if len(parts) not in (2, 3) or scale not in SCALES:
        raise UserError(f"--param {spec!r}: a range is LOW:HIGH, LOW:HIGH:log or LOW:HIGH:int")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"--param {spec!r}: LOW and HIGH must be numbers") from None
    if not low < high or (scale == "log" and low <= 0) or (scale == "int" and not (low.is_integer() and high.is_integer())):
        raise UserError(f"--param {spec!r}: need LOW < HIGH (positive for log, whole numbers for int)")
    default = OmegaConf.select(cfg, key)
    if scale != "int" and isinstance(default, int) and not isinstance(default, bool):
        raise UserError(f"--param {spec!r}: {key} is a whole number; search it with {name}={values}:int")
    return Param(name, key, low, high, scale)


def _value(text: str) -> Any:
    """A listed value as the config would read it: 1e-4 is a number (YAML 1.1 reads it as text)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Objective:
    """`[DATASETS:]PROTOCOL:METRIC[:FRACTION]`, maximised: the metric's mean over the datasets' val splits."""

    datasets: tuple[str, ...]
    protocol: str
    metric: str
    fraction: float = 1.0

    @classmethod
    def parse(cls, spec: str, default_datasets: list[str]) -> "Objective":
        from bench.datasets import get_adapter

        parts = spec.split(":")
        if len(parts) == 2 or (len(parts) == 3 and parts[0] in PROTOCOLS):
            parts = [",".join(default_datasets), *parts]
        if len(parts) not in (3, 4):
            raise UserError(f"--objective {spec!r}: expected [DATASETS:]PROTOCOL:METRIC[:FRACTION], e.g. "
                            f"rsna,chexpert:linear-probe:auc")
        datasets = tuple(d for d in parts[0].split(",") if d)
        for d in datasets:
            get_adapter(d)
        protocol, metric = parts[1], parts[2]
        if protocol not in PROTOCOLS:
            raise UserError(f"--objective {spec!r}: unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        valid = sorted({m for names in METRICS.values() for m in names})
        if metric not in valid:
            raise UserError(f"--objective {spec!r}: unknown metric {metric!r}; valid: {', '.join(valid)}")
        fraction = float(parts[3]) if len(parts) == 4 else 1.0
        if not 0 < fraction <= 1 or not datasets:
            raise UserError(f"--objective {spec!r}: needs at least one dataset and a fraction in (0, 1]")
        return cls(datasets, protocol, metric, fraction)

    @property
    def text(self) -> str:
        return f"{','.join(self.datasets)}:{self.protocol}:{self.metric}:{self.fraction:g}"


@dataclass
class SweepSpec:
    """Everything that defines a study; stored in it, so a resumed or joined study is the same search."""

    method: str
    ablation: str
    params: list[Param]
    objective: Objective
    seeds: list[int]
    overrides: list[str]
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    sampler_seed: int = 0
    results_dir: str = "results"
    study_name: str | None = None
    storage: str | None = None
    identity: dict = field(init=False)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if not self.params:
            raise UserError("a sweep needs at least one --param NAME=LOW:HIGH or NAME=a,b,c")
        if not self.seeds:
            raise UserError("--seeds is empty: give at least one pretraining seed, e.g. --seeds 0")
        if self.sampler == "grid" and any(p.choices is None for p in self.params):
            raise UserError("--sampler grid needs every --param as a list of values (NAME=a,b,c)")
        self.identity = {"method": self.method, "ablation": self.ablation, "objective": self.objective.text,
                         "seeds": self.seeds, "overrides": self.overrides,
                         "params": [{k: v for k, v in asdict(p).items() if k != "name"} for p in self.params]}
        self.study_name = self.study_name or f"{self.method}-{self.ablation}-{stable_hash(self.identity)[:8]}"
        for p in self.params:  # every value a trial can draw is checked before the first trial runs
            for value in p.choices or ((int(p.low), int(p.high)) if p.scale == "int" else (p.low, p.high)):
                try:
                    self.config(self.seeds[0], {p.key: value})
                except UserError as exc:
                    raise UserError(f"--param {p.name}: {exc}") from None

    @property
    def folder(self) -> Path:
        return Path(self.results_dir).expanduser() / "sweeps" / self.study_name

    def config(self, seed: int, values: dict[str, Any] | None = None, *, ablation: str | None = None,
               extra: list[str] = ()) -> DictConfig:
        """The run config of a trial (its parameter values), or of the final runs."""
        overrides = [*self.overrides, *(f"{k}={_override_value(v)}" for k, v in (values or {}).items()), *extra,
                     f"results_dir={self.results_dir}"]
        cfg = compose_config(self.method, self.ablation, seed, overrides)
        if ablation is not None:
            cfg.ablation = ablation
        return cfg


def _override_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def open_storage(spec: str | None, folder: Path):
    """Optuna storage from `--storage`: an RDB URL (with heartbeats, so a dead worker's trial is retried) or a
    journal file path; default `<folder>/study.journal`."""
    import optuna

    if spec and "://" in spec:
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(spec, heartbeat_interval=60, grace_period=180,
                                  failed_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            except Exception as exc:  # noqa: BLE001 - driver missing, server down, bad URL: one clear line
                raise UserError(f"--storage {spec}: cannot open ({type(exc).__name__}: {exc})") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(spec).expanduser() if spec else folder / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _sampler(spec: SweepSpec):
    import optuna

    # concurrent workers must not draw the same values, so each process mixes its id into the seed; what was
    # drawn is stored in the study
    seed = int(np.random.SeedSequence([spec.sampler_seed, os.getpid()]).generate_state(1)[0])
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in spec.params}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, spec.trials // 3)))


def _pruner(spec: SweepSpec):
    import optuna

    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    # Optuna's default of 5 finished trials before pruning, fewer for short studies
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, spec.trials // 3)), n_warmup_steps=0)


def load_study(spec: SweepSpec, create: bool = True):
    """(the spec's study, its storage); the study is created on first use, and one made by a different search
    is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.storage, spec.folder)
    if create:
        study = optuna.create_study(study_name=spec.study_name, storage=storage, direction="maximize",
                                    sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
    else:
        try:
            study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=_sampler(spec),
                                      pruner=_pruner(spec))
        except KeyError:
            raise UserError(f"no study {spec.study_name!r} in {spec.storage or spec.folder / 'study.journal'}; "
                            f"run the sweep first") from None
    stored = study.user_attrs.get("spec")
    if stored is None:
        study.set_user_attr("spec", spec.identity)
    elif stored != json.loads(json.dumps(spec.identity)):
        raise UserError(f"study {spec.study_name!r} was created by a different search ({_diff(stored, spec.identity)}); "
                        f"use another --study-name or the study's own settings")
    return study, storage


def _diff(stored: dict, now: dict) -> str:
    keys = [k for k in now if json.dumps(stored.get(k), sort_keys=True) != json.dumps(now[k], sort_keys=True)]
    return "; ".join(f"{k}: stored {stored.get(k)}, now {now[k]}" for k in keys)


class TrialValidation:
    """The trainer's end-of-epoch hook in a sweep: the objective on validation, reported to Optuna; a trial the
    pruner rejects stops here (optuna.TrialPruned leaves the trainer before it checkpoints the epoch)."""

    stop = False

    def __init__(self, trial, score, step_offset: int):
        self.trial, self.score, self.step_offset = trial, score, step_offset

    def __call__(self, method, epoch: int) -> None:
        import optuna

        value = self.score(method)
        step = self.step_offset + epoch
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", {"step": step, "value": value})
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} with validation {value:.4f}")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def validation_score(cfg: DictConfig, objective: Objective, device, run_dir: Path):
    """A function (model, during_training) -> the objective on the datasets' validation splits. A fine-tune
    objective is tracked during pretraining by the linear probe, which trains nothing; its fine-tuning runs
    of the pretrained model live in the trial's run folder, so a resumed trial resumes them."""
    from bench.evaluation.protocols.fine_tune import remove_weights
    from bench.experiment.chain import load_dataset
    from bench.experiment.config import eval_hash

    workers, datasets = loader_workers(cfg.runtime.num_workers, device), {}

    def score(method, during_training: bool = False) -> float:
        protocol = "linear-probe" if during_training and objective.protocol not in FROZEN else objective.protocol
        features = FeatureCache(None, int(cfg.eval.batch_size), device, workers)  # weights change every epoch
        values = []
        for name in objective.datasets:
            if name not in datasets:
                datasets[name] = load_dataset(cfg, name)
            data = datasets[name]
            ctx = EvalContext(method, data, cfg, device, features, workers, report_split="val")
            for seed in [int(s) for s in cfg.eval.seeds][:1 if protocol == "zero-shot" else None]:
                folder = run_dir / "sweep-finetune" / (
                    f"{name}-f{objective.fraction:g}-e{seed}-{eval_hash(cfg, protocol, name)[:8]}")
                result = run_protocol(ctx, protocol, objective.fraction, seed, folder)
                if protocol == "fine-tune":
                    remove_weights(folder)
                metrics = task_metrics(data.task.kind, result.y, result.scores, data.task.labels, result.thresholds)[0]
                values.append(float(metrics.get(objective.metric, float("nan"))))
        defined = [v for v in values if not math.isnan(v)]
        return float(np.mean(defined)) if defined else float("nan")

    return score


class SurplusTrial(Exception):
    """A trial asked for after the study already held its number of trials (workers raced); not run."""


def requeue_abandoned(study, storage) -> int:
    """Trials whose worker died (a RUNNING trial of a dead process on this host) or was interrupted are
    failed and queued again with the same parameters, so their pretraining resumes. Returns how many."""
    from optuna.trial import TrialState

    from bench.core.io import process_alive

    host, queued = socket.gethostname(), 0
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        worker = t.user_attrs.get("worker") or {}
        dead = (t.state == TrialState.RUNNING and worker.get("host") == host and worker.get("pid") != os.getpid()
                and not process_alive(int(worker.get("pid", 0))))
        if dead:
            storage.set_trial_user_attr(t._trial_id, "abandoned", "worker process died")
            study.tell(t.number, state=TrialState.FAIL)
        if (dead or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))) and t.number not in retried:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
            queued += 1
    return queued


def counted(study) -> int:
    """Trials that count towards --trials: finished, pruned, running or queued (not failed)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False))


def make_objective(spec: SweepSpec, store, device):
    """The function Optuna calls per trial."""
    import optuna
    from optuna.trial import TrialState

    from bench.experiment.chain import pretrain

    def objective(trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        ahead = [t for t in trial.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state != TrialState.FAIL]
        if len(ahead) >= spec.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {spec.trials} trials")
        values = {p.key: p.suggest(trial) for p in spec.params}
        started, per_seed = time.perf_counter(), {}
        try:
            for i, seed in enumerate(spec.seeds):
                cfg = spec.config(seed, values, extra=[f"eval.datasets=[{','.join(spec.objective.datasets)}]"])
                run_dir = store.run_dir(cfg.method.name, cfg.ablation, pretrain_hash(cfg), seed)
                score = validation_score(cfg, spec.objective, device, run_dir)
                hook = TrialValidation(trial, lambda m: score(m, during_training=True), i * int(cfg.trainer.epochs))
                method, final = pretrain(cfg, store, device, hook)
                per_seed[str(seed)] = score(method)
                trial.set_user_attr("runs", {**trial.user_attrs.get("runs", {}), str(seed): str(final.parent)})
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        value = float(np.mean(list(per_seed.values())))
        trial.set_user_attr("value_per_seed", per_seed)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        if math.isnan(value):
            raise optuna.TrialPruned("the objective is undefined on validation (e.g. one class only)")
        return value

    return objective


def run_sweep(spec: SweepSpec) -> dict:
    """Run this worker's share of the study's missing trials, then write the sweep's outputs."""

    from optuna.trial import TrialState

    from bench.core.results import ResultsStore
    from bench.experiment.chain import quiet_libraries
    from bench.train.trainer import resolve_device

    quiet_libraries()
    ResultsStore(spec.results_dir).check_writable()
    study, storage = load_study(spec)
    probe = spec.config(spec.seeds[0])
    if probe.runtime.threads:
        import torch

        torch.set_num_threads(int(probe.runtime.threads))
    device = resolve_device(probe.runtime.device)
    store = ResultsStore(spec.results_dir)
    objective = make_objective(spec, store, device)
    ran = 0
    with sealed("test"):
        while True:
            requeue_abandoned(study, storage)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if counted(study) >= spec.trials and TrialState.WAITING not in states:  # queued retries still run
                break
            before = len(study.trials)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # Optuna's "trial failed" for surplus trials
                study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=False)
            last = study.trials[before] if len(study.trials) > before else None
            if last is not None and last.user_attrs.get("surplus"):
                break
            ran += 1
            _print_trial(study, spec)
    return {"ran": ran, "outputs": write_outputs(study, spec)}


def _print_trial(study, spec: SweepSpec) -> None:
    from optuna.trial import TrialState

    mine = [t for t in study.get_trials(deepcopy=False) if (t.user_attrs.get("worker") or {}).get("pid") == os.getpid()
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not mine:
        return
    t = mine[-1]
    params = ", ".join(f"{p.name}={t.params.get(p.key)}" for p in spec.params)
    shown = "pruned" if t.state == TrialState.PRUNED else f"{spec.objective.metric}={t.value:.4f}"
    done = sum(x.state in (TrialState.COMPLETE, TrialState.PRUNED) for x in study.get_trials(deepcopy=False))
    print(f"bench: trial {t.number} ({params}): {shown} [{done}/{spec.trials} done]", file=sys.stderr)


def trials_frame(study, spec: SweepSpec):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     **{f"param/{p.name}": t.params.get(p.key) for p in spec.params},
                     **{f"seed/{k}": v for k, v in (t.user_attrs.get("value_per_seed") or {}).items()},
                     "epochs_reported": len(t.intermediate_values),
                     "seconds": t.user_attrs.get("seconds"), "retry_of": t.user_attrs.get("retry_of"),
                     "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None})
    return pd.DataFrame(rows)


def write_outputs(study, spec: SweepSpec) -> list[Path]:
    """best.json, trials.csv and the plots, next to the study."""
    from optuna.trial import TrialState

    from bench.core.io import atomic_write_json, atomic_write_text

    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study, spec)
    atomic_write_text(folder / "trials.csv", frame.to_csv(index=False))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    states = {s.name.lower(): int((frame["state"] == s.name.lower()).sum()) if len(frame) else 0
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    summary = {"study": spec.study_name, "objective": spec.objective.text, "direction": "maximize",
               "trials": states, "spec": spec.identity}
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary["best"] = {"trial": best.number, "value": best.value, "params": dict(best.params),
                           "value_per_seed": best.user_attrs.get("value_per_seed"),
                           "overrides": [f"{k}={_override_value(v)}" for k, v in best.params.items()]}
    atomic_write_json(folder / "best.json", summary)
    return [folder / "best.json", folder / "trials.csv", *write_plots(study, spec, folder)]


def write_plots(study, spec: SweepSpec, folder: Path) -> list[Path]:
    """Optimisation history, intermediate values, parameter importance, slice (and contour with two or more
    parameters) as PNG; a plot the study cannot support yet (too few finished trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    keys = [p.key for p in spec.params]
    plots = {"history": lambda: ovm.plot_optimization_history(study, target_name=spec.objective.metric),
             "intermediate": lambda: ovm.plot_intermediate_values(study),
             "slice": lambda: slice_plot(study, spec)}
    if len(complete) >= 2:
        plots["importance"] = lambda: ovm.plot_param_importances(study, target_name=spec.objective.metric)
    if len(keys) >= 2:
        plots["contour"] = lambda: ovm.plot_contour(study, params=keys, target_name=spec.objective.metric)
    written = []
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                ax = draw()
            except (ValueError, RuntimeError) as exc:  # e.g. importance with no variation: skip this plot only
                print(f"bench: sweep plot {name} skipped ({exc})", file=sys.stderr)
                continue
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).get_figure()
        fig.set_size_inches(max(6.4, 4 * len(keys)) if name in ("slice", "contour") else 6.4, 4.8)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def slice_plot(study, spec: SweepSpec):
    """The objective against each parameter, pruned trials included (Optuna's slice plot leaves them out, and
    with a pruner most trials are pruned): a pruned trial is drawn hollow at its last reported value."""
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, axes = plt.subplots(1, len(spec.params), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], spec.params):
        for state, style in ((TrialState.COMPLETE, dict(color="C0", label="complete")),
                             (TrialState.PRUNED, dict(facecolors="none", edgecolors="C3", label="pruned (last value)"))):
            trials = [t for t in study.get_trials(deepcopy=False, states=(state,)) if t.value is not None]
            ax.scatter([t.params[p.key] for t in trials if p.key in t.params],
                       [t.value for t in trials if p.key in t.params], **style)
        ax.set_xlabel(p.name)
        if p.scale == "log":
            ax.set_xscale("log")
    axes[0][0].set_ylabel(f"val {spec.objective.metric} ({spec.objective.text})")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{spec.study_name}: objective by parameter")
    return axes


def finalize(spec: SweepSpec, final_seeds: list[int], force: bool = False) -> list[Path]:
    """Retrain the best trial's configuration with `final_seeds` and evaluate it on test as `bench run` does;
    its records carry the ablation `sweep-<study>` and a `sweep` field naming the study and the trial."""
    from bench.core.results import ResultsStore
    from bench.experiment.chain import (
        evaluate,
        pretrain,
        quiet_libraries,
        report_timing,
        subject_of_run,
    )
    from bench.train.trainer import resolve_device

    quiet_libraries()
    study, _ = load_study(spec, create=False)
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise UserError(f"study {spec.study_name!r} has no finished trial yet; run the sweep first")
    best = max(complete, key=lambda t: t.value)
    marker = {"sweep": {"study": spec.study_name, "trial": best.number, "value": best.value,
                        "objective": spec.objective.text, "params": dict(best.params),
                        "base_ablation": spec.ablation}}
    store, written = ResultsStore(spec.results_dir), []
    store.check_writable()
    for seed in final_seeds:
        cfg = spec.config(seed, dict(best.params), ablation=f"sweep-{spec.study_name}")
        device = resolve_device(cfg.runtime.device)
        method, final = pretrain(cfg, store, device)
        subject = subject_of_run(cfg, final)
        summary = evaluate(cfg, method, subject, store, device, force, provenance=marker)
        report_timing(subject, summary)
        written += summary["written"]
    write_outputs(study, spec)
    return written
