import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tests_support import run_dir_of

from bench.core.errors import TrainingDiverged
from bench.core.results import ResultsStore
from bench.experiment.pretraining import build_method, pretrain
from bench.train.trainer import CHECKPOINT, FINAL, cosine_with_warmup, param_groups


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


def test_resume_after_sigkill_ends_with_the_same_weights(tiny_cfg, tmp_path):
    """Kill a real `bench run` mid-epoch, re-run the same command, compare with an uninterrupted run."""
    base = ["trainer.epochs=3", "trainer.checkpoint_every=2", "eval.protocols=[]", "eval.random_init_baseline=false"]
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
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(method_cls, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        pretrain(cfg, store, torch.device("cpu"))
    run_dir = run_dir_of(cfg.results_dir)
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert state["step"] == 2 and not (run_dir / FINAL).exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
