"""DDP under torchrun, on CPU with gloo: two processes that each take their share of a global batch compute
the loss and gradients one process computes on the whole batch, and a real `bench run` under torchrun
writes every file once and resumes after its processes are killed.

Run as a script under torchrun (`python -m torch.distributed.run ... tests/test_distributed.py OUT`), this
file is also the worker of the equivalence test."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from tests_support import run_dir_of

from bench.core.results import ResultsStore
from bench.data.corpus import MixedBatchSampler
from bench.experiment.config import compose_config
from bench.experiment.pretraining import build_corpus, build_method, pretrain
from bench.train import distributed
from bench.train.trainer import CHECKPOINT, FINAL, Trainer

CPU = torch.device("cpu")
NO_DROPOUT = ["+model.text.config.hidden_dropout_prob=0.0", "+model.text.config.attention_probs_dropout_prob=0.0"]
# case -> (method, overrides); each case is one optimiser step of two micro-batches of 8 samples (global)
CASES = {
    "clip": ("clip", []),
    # ITC alone over the mixed corpus: paired rows, image-only rows with prompts (equal prompts are one
    # caption group across ranks) and text-only rows, in every micro-batch
    "mmclip-itc": ("mmclip", ["method.image_masking.enabled=false", "method.text_masking.enabled=false",
                              "data.corpus.text_only=[mimic-cxr]"]),
    # ITC and EntMLM: text masks come from per-sample seeds, so both sides mask the same words, and the MLM mean
    # is over the global batch's masked word-pieces (bench.modeling.losses.rank_weight)
    "mmclip-mlm": ("mmclip", ["method.image_masking.enabled=false", "method.text_masking.decoder_image=full",
                              "data.corpus.text_only=[mimic-cxr]"]),
    # every branch; random image masks differ between ranks, so only synchronisation is checked
    "mmclip": ("mmclip", []),
    # MLIP's global and patch-sentence losses, each rank's rows against every rank's (no random mask)
    "mlip-psm": ("mlip", ["method.masking.enabled=false", "method.integrity.enabled=false",
                          "method.mim.enabled=false"]),
    "mlip": ("mlip", []),
}
EXACT = ("clip", "mmclip-itc", "mmclip-mlm", "mlip-psm")
# rows of one optimiser step (2 micro-batches of 8 paired rows, and on top 4 image-only and, where read, 4 text-only)
ROWS = {"clip": 16, "mmclip-itc": 32, "mmclip-mlm": 32, "mmclip": 24, "mlip-psm": 16, "mlip": 16}


def one_step(case: str, run_dir: Path) -> dict:
    """The trainer's forward and backward of one optimiser step of `case` on this rank's share of the first
    global batch: the logged loss parts (averaged over ranks) and the synchronised gradients."""
    method_name, extra = CASES[case]
    cfg = compose_config(method_name, overrides=[*TINY, *NO_DROPOUT, "trainer.batch_size=8", "trainer.accumulate=2",
                                                 *extra])
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    method.prepare(corpus)
    trainer = Trainer(cfg.trainer, run_dir, CPU, progress=False)
    model = distributed.wrap(method, CPU)
    batches = iter(trainer.loader(corpus, sampler, method.make_collate(), 0))
    parts, n_images = trainer.accumulate(model, batches, 0)
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
    return {"parts": parts, "n_images": n_images, "grads": grads}


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world, _ = distributed.init_from_env()
    assert world == 2
    for case in CASES:
        torch.save(one_step(case, out / case), out / f"{case}.rank{rank}.pt")


def _torchrun(*args: str, **kwargs) -> subprocess.Popen:
    """torchrun with two CPU processes on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _assert_same_gradients(got: dict, want: dict, case: str, rel: float = 2e-5) -> None:
    """Equal within float noise, measured on the whole gradient: some tensors' gradients are zero in exact
    arithmetic (the attention keys' biases), so their own relative error is noise over noise."""
    assert got.keys() == want.keys(), case
    errors = {name: float((g - want[name]).norm()) for name, g in got.items()}
    error = sum(e * e for e in errors.values()) ** 0.5
    scale = float(torch.cat([g.flatten() for g in want.values()]).norm())
    assert error <= rel * scale, (case, error / scale, max(errors, key=errors.get))


def test_rank_slices_have_the_global_composition_and_cover_the_batch_once():
    sizes, per_batch = {"paired": 40, "image_only": 9, "text_only": 30}, {"paired": 8, "image_only": 4, "text_only": 2}
    sampler = MixedBatchSampler(sizes, per_batch, seed=1)
    slices = [list(distributed.RankSlice(sampler, r, 2)) for r in range(2)]
    for whole, a, b in zip(sampler.batches(), *slices):
        assert sorted(a + b) == sorted(whole)
        for part in (a, b):
            assert [sum(lo <= i < hi for i in part) for lo, hi in ((0, 40), (40, 49), (49, 79))] == [4, 2, 1]
    with pytest.raises(ValueError, match="split evenly"):
        distributed.RankSlice(sampler, 0, 4)


def test_two_ranks_compute_the_loss_and_gradients_of_one_process_on_the_global_batch(data_home, tmp_path):
    proc = _torchrun(__file__, str(tmp_path))
    single = {case: one_step(case, tmp_path / "single" / case) for case in EXACT}
    _finish(proc)
    for case in CASES:
        ranks = [torch.load(tmp_path / f"{case}.rank{r}.pt") for r in range(2)]
        # DDP leaves the same gradients on every rank, and the same logged (rank-averaged) loss
        assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() and ranks[0]["grads"], case
        for name, g in ranks[0]["grads"].items():
            assert torch.equal(g, ranks[1]["grads"][name]), (case, name)
        assert ranks[0]["parts"] == ranks[1]["parts"] and ranks[0]["n_images"] == ROWS[case], case
        if case not in EXACT:
            assert all(torch.isfinite(g).all() for g in ranks[0]["grads"].values())
            continue
        assert ranks[0]["parts"]["loss"] == pytest.approx(single[case]["parts"]["loss"], rel=1e-5), case
        _assert_same_gradients(ranks[0]["grads"], single[case]["grads"], case)


def test_bench_run_under_torchrun_writes_every_file_once_and_resumes_after_a_kill(data_home, tmp_path):
    overrides = [*TINY, *NO_DROPOUT, "trainer.budget.steps=6", "eval.datasets=[rsna]",
                 "eval.protocols=[zero-shot,fine-tune]", "eval.fine_tune.fractions=null",
                 "eval.random_init_baseline=false", "runtime.device=cpu",
                 "runtime.threads=1"]
    # the same global batches in one process, uninterrupted
    single = compose_config("clip", overrides=[*overrides, f"results_dir={tmp_path / 'single'}"])
    pretrain(single, ResultsStore(single.results_dir), CPU)
    want = [json.loads(line) for line in (run_dir_of(single.results_dir) / "metrics.jsonl").read_text().splitlines()]

    results = tmp_path / "ddp"
    # lines: the progress and the summary print (the tests' settings are quiet), so that rank 0 alone prints shows
    run = ["-m", "bench.cli", "run", "--method", "clip", "--no-table", "--results-dir", str(results), *overrides,
           "runtime.progress=lines"]
    killed, deadline = _torchrun(*run), time.time() + 180
    try:
        while not list(results.glob(f"runs/*/{CHECKPOINT}")) and killed.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        killed.send_signal(signal.SIGTERM)  # as Slurm ends a job: torchrun stops its workers
        out = killed.communicate(timeout=120)[0]
    run_dir = run_dir_of(results)
    assert (run_dir / CHECKPOINT).exists(), out[-4000:]
    assert not (run_dir / FINAL).exists(), "killed too late: the run had already finished"
    interrupted_at = torch.load(run_dir / CHECKPOINT, weights_only=False)["step"]
    out = _finish(_torchrun(*run))

    run_dir = run_dir_of(results)
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert interrupted_at < state["step"] == 6 and (run_dir / FINAL).exists()
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    # the resumed steps carry on from the checkpoint's weights, optimiser state and place in the data
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    assert out.count("2 record(s) in ") == 1, out[-4000:]  # written by rank 0 alone
    records = [json.loads(p.read_text()) for p in (results / "records").rglob("*.json")]
    assert sorted(r["protocol"] for r in records) == ["fine-tune", "zero-shot"]
    chosen = next(r["chosen"] for r in records if r["protocol"] == "fine-tune")
    assert chosen["epochs_run"] == 2 and chosen["batch_size"] == 16
    log = next((results / "finetune").rglob("metrics.jsonl")).read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, len(log) + 1))
    assert not list((results / "finetune").rglob("*.pt"))  # removed once every rank had read them


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
