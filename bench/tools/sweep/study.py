"""Running a study: Optuna storage, sampler and pruner, the trial objective, the workers' loop, and
`--finalize`."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.progress import QUIET, display_mode
from bench.core.registry import PROTOCOLS
from bench.data.splits import sealed
from bench.tools.sweep.outputs import write_outputs
from bench.tools.sweep.spec import Objective, SweepSpec
from bench.train import distributed
from bench.train.loggers import Curves, open_curves


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
    """The trainer's end-of-epoch hook in a sweep: the objective on validation, reported to Optuna and drawn on
    the trial's curve (`curves`, at Optuna's step) and on the pretraining run's own (`val/<metric>`); a trial
    the pruner rejects stops here (optuna.TrialPruned leaves the trainer before it checkpoints the epoch)."""

    stop = False

    def __init__(self, trial, score, step_offset: int, metric: str, curves: Curves):
        self.trial, self.score, self.step_offset, self.metric, self.curves = trial, score, step_offset, metric, curves

    def __call__(self, method, epoch: int) -> dict[str, float]:
        import optuna

        value = self.score(method)
        step = self.step_offset + epoch
        self.trial.report(value, step)
        self.curves.log({f"val/{self.metric}": value}, step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", {"step": step, "value": value})
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} with validation {value:.4f}")
        return {f"val/{self.metric}": value}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def validation_score(cfg: DictConfig, objective: Objective, device, run_dir: Path):
    """A function (model, during_training) -> the objective on the datasets' validation splits. A fine-tune
    objective is tracked during pretraining by the linear probe, which trains nothing; its fine-tuning runs
    of the pretrained model live in the trial's run folder, so a resumed trial resumes them. An objective
    the linear probe cannot track (segmentation's Dice) is not tracked during training (`tracks_training`)."""
    from bench.data.loading import load_dataset
    from bench.evaluation.features import FeatureCache
    from bench.evaluation.protocol import EvalContext, reads_reports, run_protocol
    from bench.experiment.identity import eval_hash
    from bench.train.speed import loader_workers

    workers, datasets = loader_workers(cfg.runtime.num_workers, device), {}
    tracked = tracked_protocol(objective)

    def score(method, during_training: bool = False) -> float:
        protocol = tracked if during_training and tracked else objective.protocol
        jobs = PROTOCOLS.get(protocol).jobs([objective.fraction], cfg.eval.seeds)
        features = FeatureCache(None, int(cfg.eval.batch_size), device, workers)  # weights change every epoch
        values = []
        for name in objective.datasets:
            if name not in datasets:
                datasets[name] = load_dataset(cfg, name, with_reports=reads_reports(protocol, name))
            data = datasets[name]
            ctx = EvalContext(method, data, cfg, device, features, workers, report_split="val")
            for fraction, seed in jobs:
                folder = run_dir / "sweep-finetune" / (
                    f"{name}-f{fraction:g}-e{seed}-{eval_hash(cfg, protocol, name)[:8]}")
                result = run_protocol(ctx, protocol, fraction, seed, folder)
                PROTOCOLS.get(protocol).remove_outputs(cfg, folder)
                values.append(float(result.metrics().get(objective.metric, float("nan"))))
        defined = [v for v in values if not math.isnan(v)]
        return float(np.mean(defined)) if defined else float("nan")

    return score


def tracked_protocol(objective: Objective) -> str | None:
    """What scores the objective after each pretraining epoch: the objective's own protocol when it trains
    nothing, else the linear probe where it has the metric, else nothing (the trial is scored once, at the end)."""
    own = PROTOCOLS.get(objective.protocol)
    if own.frozen:
        return objective.protocol
    return "linear-probe" if PROTOCOLS.get("linear-probe").is_metric(objective.metric) else None


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

    from bench.experiment.identity import pretrain_hash
    from bench.experiment.pretraining import pretrain

    def objective(trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        ahead = [t for t in trial.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state != TrialState.FAIL]
        if len(ahead) >= spec.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {spec.trials} trials")
        values = {p.key: p.suggest(trial) for p in spec.params}
        started, per_seed = time.perf_counter(), {}
        # the trial's validation curve, beside the study: one logdir compares the trials. Not in wandb, which
        # holds one run at a time in a process, and the trial's pretraining runs have their own open meanwhile
        loggers = [name for name in spec.config(spec.seeds[0]).runtime.loggers if name != "wandb"]
        curves = open_curves(loggers, spec.folder, name=f"trial-{trial.number}") \
            if tracked_protocol(spec.objective) and distributed.is_main() else Curves([])  # rank 0 writes files
        try:
            for i, seed in enumerate(spec.seeds):
                cfg = spec.config(seed, values, extra=[f"eval.datasets=[{','.join(spec.objective.datasets)}]"])
                run_dir = store.run_dir(cfg.method.name, cfg.ablation, pretrain_hash(cfg), seed)
                score = validation_score(cfg, spec.objective, device, run_dir)
                # seed i reports after seed i-1's last epoch: a step budget runs at most `steps` epochs
                budget = cfg.trainer.budget
                epochs = int(budget.steps) if budget.get("steps") else int(budget.epochs)
                hook = TrialValidation(trial, lambda m: score(m, during_training=True), i * epochs,
                                       spec.objective.metric, curves) if tracked_protocol(spec.objective) else None
                method, final = pretrain(cfg, store, device, hook)
                per_seed[str(seed)] = score(method)
                trial.set_user_attr("runs", {**trial.user_attrs.get("runs", {}), str(seed): str(final.parent)})
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        finally:
            curves.close()
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

    from bench.experiment.setup import start

    runtime = spec.config(spec.seeds[0]).runtime
    device, store = start(runtime, spec.results_dir)
    quiet = display_mode(runtime.progress) == QUIET
    study, storage = load_study(spec)
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
            if not quiet:
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


def finalize(spec: SweepSpec, final_seeds: list[int], force: bool = False) -> list[Path]:
    """Retrain the best trial's configuration with `final_seeds` and evaluate it on test as `bench run` does;
    its records carry the ablation `sweep-<study>` and a `sweep` field naming the study and the trial."""
    from optuna.trial import TrialState

    from bench.experiment.chain import pretrain_and_evaluate
    from bench.experiment.evaluating import report_timing
    from bench.experiment.setup import start

    device, store = start(spec.config(final_seeds[0] if final_seeds else spec.seeds[0]).runtime, spec.results_dir)
    study, _ = load_study(spec, create=False)

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise UserError(f"study {spec.study_name!r} has no finished trial yet; run the sweep first")
    best = max(complete, key=lambda t: t.value)
    marker = {"sweep": {"study": spec.study_name, "trial": best.number, "value": best.value,
                        "objective": spec.objective.text, "params": dict(best.params),
                        "base_ablation": spec.ablation}}
    written = []
    for seed in final_seeds:
        cfg = spec.config(seed, dict(best.params), ablation=f"sweep-{spec.study_name}")
        subject, summary = pretrain_and_evaluate(cfg, store, device, force=force, provenance=marker)
        report_timing(subject, summary, quiet=display_mode(cfg.runtime.progress) == QUIET)
        written += summary["written"]
    write_outputs(study, spec)
    return written
