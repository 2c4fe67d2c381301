"""Training curves (`runtime.loggers`): TensorBoard event files read back equal metrics.jsonl, a resumed run
holds each step once, fine-tuning's validation metric outlives its weights, and bad settings are one line."""
import json
import math
import sys
import time
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests_support import run_dir_of

from bench.core.errors import UserError
from bench.core.results import ResultsStore
from bench.data.loading import load_dataset
from bench.evaluation.features import FeatureCache
from bench.evaluation.protocol import EvalContext
from bench.evaluation.protocols.fine_tune import FineTune, fine_tune
from bench.experiment.config import compose_config
from bench.experiment.pretraining import build_method, pretrain
from bench.train import loggers
from bench.train.loggers import open_curves

CPU = torch.device("cpu")


def _events(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (purged steps left out)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_curves_equal_the_log(run_dir) -> dict:
    rows, events = _rows(run_dir), _events(run_dir / "tensorboard")
    steps = [r["step"] for r in rows]
    columns = {"loss": "loss/total", "itc": "loss/itc", "lr": "train/lr", "images_per_s": "train/images_per_s",
               "logit_scale": "train/logit_scale"}
    for column, tag in columns.items():
        assert [s for s, _ in events[tag]] == steps, f"{tag}: each step once, as in metrics.jsonl"
        for (_, value), row in zip(events[tag], rows):
            assert value == pytest.approx(row[column], rel=1e-6), (tag, row["step"])
    for (_, value), row in zip(events["train/temperature"], rows):
        assert value == pytest.approx(1 / row["logit_scale"], rel=1e-6)
    assert not {"step", "epoch", "train/step", "train/epoch", "loss/step", "loss/epoch"} & set(events)
    return events


SHORT = ("trainer.budget.steps=4",)  # checkpoints at steps 2 and 4 (the tiny config's checkpoint_every=2)


def test_pretraining_curves_read_back_equal_metrics_jsonl(tiny_cfg):
    cfg = tiny_cfg(extra=SHORT)
    assert list(cfg.runtime.loggers) == ["jsonl", "tensorboard"], "TensorBoard curves are on by default"
    _, final = pretrain(cfg, ResultsStore(cfg.results_dir), CPU)
    _assert_curves_equal_the_log(final.parent)


def test_a_resumed_run_shows_each_step_once(tiny_cfg, monkeypatch):
    """Killed after logging step 3 with the checkpoint at step 2: the resumed run logs step 3 again, and the
    curves must show its values only, as metrics.jsonl does."""
    cfg = tiny_cfg(extra=SHORT)
    store = ResultsStore(cfg.results_dir)
    method_cls = type(build_method(cfg, 0))
    original = method_cls.training_step
    calls = {"n": 0}

    def dies_in_step_four(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # call 1 counts the FLOPs, then steps 1 to 4
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(method_cls, "training_step", dies_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, store, CPU)
    monkeypatch.setattr(method_cls, "training_step", original)
    run_dir = run_dir_of(cfg.results_dir)
    assert [s for s, _ in _events(run_dir / "tensorboard")["loss/total"]] == [1, 2, 3]
    killed_speed = dict(_events(run_dir / "tensorboard")["train/images_per_s"])[3]
    # TensorBoard orders event files by name, which starts with the second they were opened in: a real
    # restart is seconds later, so the resumed run's file opens in a later second here too
    time.sleep(1 - time.time() % 1 + 0.05)
    pretrain(cfg, store, CPU)
    events = _assert_curves_equal_the_log(run_dir)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    resumed_speed = dict(events["train/images_per_s"])[3]
    assert resumed_speed != killed_speed and resumed_speed == pytest.approx(_rows(run_dir)[2]["images_per_s"])


def test_fine_tuning_curves_hold_the_validation_metric_and_outlive_the_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg(extra=("eval.fine_tune.patience=null",))
    data = load_dataset(cfg, "rsna")
    ctx = EvalContext(build_method(cfg, 0), data, cfg, CPU, FeatureCache(None, int(cfg.eval.batch_size), CPU))
    folder = tmp_path / "finetune" / "clip" / "rsna-record"
    result = fine_tune(ctx, 1.0, 0, folder)
    FineTune.remove_outputs(cfg, folder)  # what happens once the record is written
    assert not (folder / "best.pt").exists()
    events = _events(folder / "tensorboard")
    by_epoch = result.chosen[f"val_{data.task.metric}_by_epoch"]
    validation = events[f"val/{data.task.metric}"]
    steps_per_epoch = len(_rows(folder)) // len(by_epoch)
    assert [s for s, _ in validation] == [steps_per_epoch * (e + 1) for e in range(len(by_epoch))]
    assert [v for _, v in validation] == pytest.approx(by_epoch, abs=1e-5)
    assert [s for s, _ in events["loss/bce"]] == [r["step"] for r in _rows(folder)]


def test_a_sweep_draws_each_trials_validation_curve(data_home, tmp_path):
    from conftest import TINY

    from bench.tools.sweep.spec import Objective, SweepSpec, parse_param
    from bench.tools.sweep.study import load_study, run_sweep

    overrides = [*TINY, "eval.datasets=[rsna]", "trainer.budget.epochs=1"]
    spec = SweepSpec("clip", "none", [parse_param("temperature=0.03:0.1", compose_config("clip", overrides=overrides))],
                     Objective.parse("rsna:zero-shot:auc", ["rsna"]), [0], overrides, 1, "random", "none", 0,
                     str(tmp_path / "results"))
    run_sweep(spec)
    trial = load_study(spec)[0].trials[0]
    assert len(trial.intermediate_values) == 1, "one epoch, one report to Optuna"
    assert _events(spec.folder / "tensorboard" / "trial-0")["val/auc"] == [
        (step, pytest.approx(value, rel=1e-6)) for step, value in trial.intermediate_values.items()]
    # the pretraining run's own curves hold it too, at the optimiser step that ended the epoch
    run_dir = run_dir_of(tmp_path / "results")
    assert [s for s, _ in _events(run_dir / "tensorboard")["val/auc"]] == [len(_rows(run_dir))]


@pytest.mark.parametrize(("loggers_value", "message"), [
    ("[tensorboard]", "runtime.loggers=['tensorboard'] is not valid: expected a list that includes jsonl"),
    ("[jsonl,csv]", "runtime.loggers[1]='csv' is not valid: expected one of jsonl, tensorboard, wandb"),
    ("[jsonl,jsonl]", "runtime.loggers=['jsonl', 'jsonl'] is not valid: expected a list without repeated"),
    ("jsonl", "runtime.loggers='jsonl' is not valid: expected a list"),
])
def test_a_bad_loggers_value_is_one_line_naming_the_key(loggers_value, message):
    with pytest.raises(UserError) as err:
        compose_config("clip", overrides=[f"runtime.loggers={loggers_value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wandb_without_the_package_is_refused_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether it is or not
    with pytest.raises(UserError, match=r"^runtime.loggers has wandb, but the wandb package is not installed"):
        compose_config("clip", overrides=["runtime.loggers=[jsonl,wandb]"])


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    curves = open_curves(["jsonl", "wandb"], tmp_path / "run-a", resumed_at=4)
    curves.log({"step": 5, "epoch": 0, "loss": 1.5, "logit_scale": 2.0, "grad_norm": math.nan, "x": None}, 5)
    curves.close()
    (_, init_kwargs), logged, finished = calls
    assert init_kwargs["mode"] == "offline" and init_kwargs["dir"] == str(tmp_path / "run-a")
    assert init_kwargs["name"] == "run-a"
    assert logged == ("log", {"loss/total": 1.5, "train/logit_scale": 2.0, "train/temperature": 0.5}, 5)
    assert finished == ("finish",)


def test_tensorboard_missing_is_one_note_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(loggers, "_noted_missing", set())
    for name in ("a", "b"):
        curves = open_curves(["jsonl", "tensorboard"], tmp_path / name)
        curves.log({"step": 1, "loss": 1.0}, 1)
        curves.close()
    assert capsys.readouterr().err.count("tensorboard package is not installed") == 1
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_loggers_do_not_change_any_hash(tiny_cfg):
    from bench.experiment.identity import config_hash, pretrain_hash

    a, b = tiny_cfg(), tiny_cfg(extra=("runtime.loggers=[jsonl]",))
    assert pretrain_hash(a) == pretrain_hash(b) and config_hash(a) == config_hash(b)
