import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests_support import run_dir_of

from bench.core.errors import TrainingDiverged
from bench.core.results import ResultsStore
from bench.experiment.pretraining import build_corpus, build_method, pretrain
from bench.train.cost import COST_FILE
from bench.train.trainer import CHECKPOINT, FINAL, Trainer, cosine_with_warmup, param_groups, training_steps


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_weight_decay_skips_norms_biases_and_temperature(tiny_cfg):
    method = build_method(tiny_cfg(), 0)
    decay, no_decay = param_groups(method, 0.05, 1e-3)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 1e-3
    names = {id(p): n for n, p in method.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in skipped and any("ln" in n or "LayerNorm" in n for n in skipped)
    assert any(n.endswith("bias") for n in skipped)


def test_lr_multipliers_scale_the_matching_parameters(tiny_cfg):
    method = build_method(tiny_cfg(), 0)
    method.lr_multipliers = lambda: {"image_tower.": 0.1, "image_tower.vit.conv1": 0.5}
    groups = param_groups(method, 0.05, 1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in method.named_parameters():
        if p.requires_grad:
            want = 5e-4 if name.startswith("image_tower.vit.conv1") else 1e-4 if name.startswith("image_tower.") else 1e-3
            assert lr_of[id(p)] == pytest.approx(want), name


def test_schedule_warms_up_then_decays_to_the_floor():
    f = cosine_with_warmup(100, 10, 0.1)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0, abs=1e-9) and f(55) < f(10)
    assert f(100) == pytest.approx(0.1)


def test_run_logs_every_step_and_writes_checkpoints(tiny_cfg):
    cfg = tiny_cfg()
    store = ResultsStore(cfg.results_dir)
    _, final = pretrain(cfg, store, torch.device("cpu"))
    run_dir = final.parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert {"loss", "itc", "lr", "images_per_s", "grad_norm"} <= set(rows[0])
    assert (run_dir / CHECKPOINT).exists() and (run_dir / "config.yaml").exists()
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["step"] == len(rows)
    cost = json.loads((run_dir / COST_FILE).read_text())
    assert cost["optimizer_steps"] == len(rows) and cost["samples"] == {"paired": 16 * len(rows)}
    assert cost["flops_counted"] == "counted" and cost["flops"] == cost["flops_per_step"] * len(rows) > 0


def test_counting_flops_leaves_training_as_it_was(tiny_cfg):
    """The FLOP count runs a forward and backward on the first batch: the weights must not depend on it."""
    weights = []
    for count in (True, False):
        cfg = tiny_cfg(extra=("trainer.budget.steps=2", f"results_dir={tiny_cfg().results_dir}-{count}"))
        method = build_method(cfg, 0)
        corpus, sampler, _ = build_corpus(cfg, 0)
        method.prepare(corpus)
        trainer = Trainer(cfg.trainer, Path(cfg.results_dir), torch.device("cpu"), progress=False, flops=count)
        weights.append(_weights(trainer.fit(method, corpus, method.make_collate(), sampler, 0)))
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_every_method_of_one_corpus_takes_the_same_steps_with_the_same_paired_rows(tiny_cfg):
    """Unpaired rows come on top of the paired ones: MMCLIP (image-only prompts) and the supervised control
    must not train more optimiser steps, or on fewer paired rows per step, than CLIP under the default budget."""
    budgets = {}
    for method in ("clip", "mmclip", "supervised", "mrm"):
        cfg = tiny_cfg(method)
        _, sampler, summary = build_corpus(cfg, 0)
        steps = training_steps(cfg.trainer.budget, len(sampler.batches()) // cfg.trainer.accumulate)
        budgets[method] = (steps, sampler.per_batch["paired"])
        if method in ("mmclip", "supervised"):
            assert summary["image_only"]["per_batch"] > 0, f"{method} reads image-only data on top"
    assert len(set(budgets.values())) == 1, budgets


def test_resume_after_sigkill_ends_with_the_same_weights(tiny_cfg, tmp_path):
    """Kill a real `bench run` mid-epoch, re-run the same command, compare with an uninterrupted run."""
    base = ["trainer.budget.epochs=3", "trainer.checkpoint_every=2", "eval.protocols=[]", "eval.random_init_baseline=false"]
    exe = os.path.join(os.path.dirname(sys.executable), "bench")
    common = ["run", "--method", "clip", "--no-table", "data.synthetic.size=tiny", "trainer.batch_size=16",
              "runtime.progress=false", "runtime.threads=1", *base]
    env = {**os.environ}

    straight = tmp_path / "straight"
    subprocess.run([exe, *common, "--results-dir", str(straight)], check=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([exe, *common, "--results-dir", str(killed)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob(f"runs/*/{CHECKPOINT}")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = run_dir_of(killed)
    assert not (run_dir / FINAL).exists(), "killed too late: the run had already finished"
    interrupted_at = torch.load(run_dir / CHECKPOINT, weights_only=False)["step"]
    subprocess.run([exe, *common, "--results-dir", str(killed)], check=True, env=env, timeout=600)

    a, b = _weights(run_dir_of(straight) / FINAL), _weights(run_dir / FINAL)
    assert interrupted_at < torch.load(run_dir / CHECKPOINT, weights_only=False)["step"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "the step log has no gaps or repeats after resume"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(extra=("trainer.checkpoint_every=1",))
    store = ResultsStore(cfg.results_dir)
    method_cls = type(build_method(cfg, 0))
    original = method_cls.training_step
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        if calls["n"] == 4:  # call 1 is the FLOP count on the first batch, then steps 1, 2, 3
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(method_cls, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        pretrain(cfg, store, torch.device("cpu"))
    run_dir = run_dir_of(cfg.results_dir)
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert state["step"] == 2 and not (run_dir / FINAL).exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
