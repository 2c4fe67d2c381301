"""The protocols on the tiny synthetic benchmark: whole-split metrics, validation-only choices, the feature
cache, fine-tuning on the shared trainer, and the records `bench run` / `bench eval` write."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bench.core.errors import UserError
from bench.core.results import ResultsStore
from bench.data.loading import load_dataset
from bench.evaluation.features import FeatureCache
from bench.evaluation.metrics import accuracy, task_metrics
from bench.evaluation.protocol import EvalContext
from bench.evaluation.protocols.fine_tune import fine_tune
from bench.evaluation.protocols.linear_probe import linear_probe
from bench.evaluation.protocols.zero_shot import zero_shot
from bench.experiment.evaluating import Subject, evaluate, random_init_subject
from bench.experiment.pretraining import build_method
from bench.modeling.fine_tune_model import FineTuneModel
from bench.train.early_stopping import EarlyStopping
from bench.train.trainer import param_groups

CPU = torch.device("cpu")


def _ctx(cfg, method, data, folder=None):
    return EvalContext(method, data, cfg, CPU, FeatureCache(folder, int(cfg.eval.batch_size), CPU))


def _arrays(result):
    preds = result.predictions()
    labels = result.task.labels
    return preds[[f"true/{c}" for c in labels]].to_numpy(), preds[[f"score/{c}" for c in labels]].to_numpy()


def test_zero_shot_covers_the_whole_split_once_whatever_the_batch_size_or_row_order(tiny_cfg):
    cfg = tiny_cfg(extra=("eval.zero_shot.prompt_sets=[chexzero,class-names]",))
    method = build_method(cfg, 0)
    data = load_dataset(cfg, "chexpert")
    results = []
    for bs, shuffle in ((7, False), (64, True)):
        cfg.eval.batch_size = bs
        if shuffle:
            data.manifest = data.manifest.sample(frac=1.0, random_state=3).reset_index(drop=True)
        results.append(zero_shot(_ctx(cfg, method, data)))
    n_test = int((data.manifest["split"] == "test").sum())
    for r in results:
        assert len(r.y) == n_test and r.test_rows["sample_id"].is_unique
    a, b = (r.numbers(cfg.eval.bootstrap) for r in results)
    for metric in a["metrics"]:
        assert a["metrics"][metric] == pytest.approx(b["metrics"][metric], abs=1e-6), metric
    # the stored predictions are enough to recompute the metric (scikit-learn's AUC)
    y, s = _arrays(results[0])
    assert a["metrics"]["auc"] == pytest.approx(np.mean(roc_auc_score(y, s, average=None)))
    assert set(a["prompt_sets"]) == {"chexzero@v1", "class-names@v1"} and "prompt_spread" in a
    assert a["chosen"]["scoring"] == "positive vs negative softmax"
    assert set(a["metrics"]) >= {"auc", "f1", "acc", "mcc"} and set(a["bootstrap"]["ci"]) == set(a["metrics"])


def test_prompt_sets_without_negatives_and_every_aggregate(tiny_cfg):
    method = build_method(tiny_cfg(), 0)
    out = {}
    for aggregate in ("embedding", "mean", "max"):
        cfg = tiny_cfg(extra=("eval.zero_shot.prompt_sets=[gloria]", f"eval.zero_shot.aggregate={aggregate}"))
        result = zero_shot(_ctx(cfg, method, load_dataset(cfg, "rsna")))
        out[aggregate] = result.scores
        assert result.chosen["scoring"] == "cosine (the set has no negative prompts)"
    assert not np.allclose(out["mean"], out["max"])
    with pytest.raises(UserError, match="aggregate"):
        cfg = tiny_cfg(extra=("eval.zero_shot.aggregate=median",))
        zero_shot(_ctx(cfg, method, load_dataset(cfg, "rsna")))


def test_multi_class_tasks_report_accuracy_from_stored_predictions(tiny_cfg):
    cfg = tiny_cfg(extra=("eval.linear_probe.c_grid=[1.0]",))
    method = build_method(cfg, 0)
    for dataset, protocol in (("covidx", zero_shot), ("chexpert-5x200", zero_shot), ("covidx", linear_probe)):
        data = load_dataset(cfg, dataset)
        ctx = _ctx(cfg, method, data)
        result = protocol(ctx) if protocol is zero_shot else protocol(ctx, 1.0, 0)
        y, s = _arrays(result)
        if data.task.kind == "multi-class":
            assert (y.sum(1) == 1).all() and np.allclose(s.sum(1), 1.0)
            assert result.numbers(cfg.eval.bootstrap)["metrics"]["acc"] == pytest.approx(accuracy(y, s))
    with pytest.raises(UserError, match="not single-label"):
        linear_probe(_ctx(cfg, method, load_dataset(cfg, "chexpert-5x200")), 1.0, 0)


def test_thresholds_come_from_validation_only(tiny_cfg):
    """Changing every test label (and nothing else) leaves the thresholds and the model's choices alone."""
    cfg = tiny_cfg(extra=("eval.linear_probe.c_grid=[0.1,1.0]",))
    method = build_method(cfg, 0)
    outs = []
    for flip in (False, True):
        data = load_dataset(cfg, "nih")
        if flip:
            test = data.manifest["split"] == "test"
            data.manifest.loc[test, data.task.labels] = 1.0 - data.manifest.loc[test, data.task.labels]
        ctx = _ctx(cfg, method, data)
        outs.append((zero_shot(ctx), linear_probe(ctx, 1.0, 0)))
    for before, after in zip(*outs):
        assert before.thresholds is not None and np.array_equal(before.thresholds, after.thresholds)
        assert before.chosen.get("C") == after.chosen.get("C")
        assert not np.array_equal(before.y, after.y)


def test_features_are_encoded_once_per_split_and_the_disk_cache_gives_identical_results(tiny_cfg, tmp_path):
    cfg = tiny_cfg(extra=("eval.linear_probe.c_grid=[1.0]",))
    method = build_method(cfg, 0)
    data = load_dataset(cfg, "rsna")
    ctx = _ctx(cfg, method, data, tmp_path / "features")
    first = [zero_shot(ctx)] + [linear_probe(ctx, f, s) for f in (0.1, 1.0) for s in (0, 1)]
    assert dict(ctx.features.encoded) == {("rsna", "val"): 1, ("rsna", "test"): 1, ("rsna", "train"): 1}
    # a new run reads the features from disk and encodes nothing; a run without the cache recomputes them
    reread, recomputed = _ctx(cfg, method, data, tmp_path / "features"), _ctx(cfg, method, data)
    for c in (reread, recomputed):
        again = [zero_shot(c)] + [linear_probe(c, f, s) for f in (0.1, 1.0) for s in (0, 1)]
        for a, b in zip(first, again):
            assert np.allclose(a.scores, b.scores, atol=1e-6)
    assert not reread.features.encoded and sum(recomputed.features.encoded.values()) == 3


def test_per_seed_fraction_subsets_are_frozen_files(tiny_cfg):
    cfg = tiny_cfg(extra=("eval.fraction_subsets=per-seed", "eval.linear_probe.c_grid=[1.0]"))
    method = build_method(cfg, 0)
    data = load_dataset(cfg, "rsna")
    ctx = _ctx(cfg, method, data)
    a, b = linear_probe(ctx, 0.1, 0), linear_probe(ctx, 0.1, 1)
    assert {"train_10_seed0.txt", "train_10_seed1.txt"} <= set(data.splits.used)
    assert a.chosen["n_train"] == b.chosen["n_train"]
    ids = [set((data.splits.directory / f"train_10_seed{s}.txt").read_text().split()) for s in (0, 1)]
    assert ids[0] != ids[1]


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(tmp_path):
    values = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(lambda m: next(values), 2, tmp_path / "best.pt")
    epochs = 0
    while not stopper.stop:
        with torch.no_grad():
            model.weight.fill_(epochs)
        stopper(model, epochs)
        epochs += 1
    assert epochs == 4 and stopper.best_epoch == 2 and stopper.best == 0.7
    assert torch.load(tmp_path / "best.pt")["weight"].eq(1).all()
    resumed = EarlyStopping(lambda m: 0.0, 2, tmp_path / "best.pt")
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.stop and resumed.history == [0.5, 0.7, 0.6, 0.65]


def test_fine_tuning_trains_the_image_encoder_at_the_multiplier_and_nothing_else(tiny_cfg):
    cfg = tiny_cfg()
    method = build_method(cfg, 0)
    probe = torch.zeros(1, 3, cfg.model.image.image_size, cfg.model.image.image_size)
    model = FineTuneModel(method, 3, True, 0.1, probe)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("encoder.image_tower.", "head.")) for n in trainable)
    lr = {id(p): g["lr"] for g in param_groups(model, 0.01, 1e-3) for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr[id(p)] == pytest.approx(1e-4 if name.startswith("encoder.") else 1e-3), name
    # the pretrained model itself is left untouched
    assert all(p.requires_grad for n, p in method.named_parameters() if n.startswith("text_tower."))


@pytest.mark.parametrize("dataset", ["rsna", "covidx"])
def test_fine_tune_selects_the_best_epoch_on_validation_and_reports_on_test(tiny_cfg, tmp_path, dataset):
    cfg = tiny_cfg(extra=("eval.fine_tune.epochs=3", "eval.fine_tune.patience=1"))
    method = build_method(cfg, 0)
    data = load_dataset(cfg, dataset)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    result = fine_tune(_ctx(cfg, method, data), 1.0, 0, tmp_path / "ft")
    chosen = result.chosen
    assert 1 <= chosen["best_epoch"] <= chosen["epochs_run"] <= 3
    history = chosen[f"val_{data.task.metric}_by_epoch"]
    assert chosen[f"val_{data.task.metric}"] == pytest.approx(max(history), abs=1e-6)
    assert len(result.y) == int((data.manifest["split"] == "test").sum())
    y, s = _arrays(result)
    metrics, _ = task_metrics(data.task.kind, y, s, data.task.labels, result.thresholds)
    assert np.isfinite(metrics["auc"])
    log = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert log and ("ce" if data.task.kind == "multi-class" else "bce") in log[0]
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items()), "the model was modified"


def test_a_killed_fine_tune_resumes_to_the_same_result(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(extra=("eval.fine_tune.epochs=3", "eval.fine_tune.patience=null"))
    method = build_method(cfg, 0)
    data = load_dataset(cfg, "siim")
    whole = fine_tune(_ctx(cfg, method, data), 1.0, 0, tmp_path / "whole")

    calls = {"n": 0}
    real = EarlyStopping.__call__

    def dies_in_epoch_two(self, model, epoch):
        real(self, model, epoch)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(EarlyStopping, "__call__", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(_ctx(cfg, method, data), 1.0, 0, tmp_path / "killed")
    monkeypatch.setattr(EarlyStopping, "__call__", real)
    resumed = fine_tune(_ctx(cfg, method, data), 1.0, 0, tmp_path / "killed")
    assert resumed.chosen["epochs_run"] == 3
    assert np.allclose(whole.scores, resumed.scores, atol=1e-5)


def test_run_writes_every_protocol_fraction_and_seed_with_the_random_init_baseline(tiny_cfg):
    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot,linear-probe,fine-tune]",
                          "eval.fractions=[0.1,1.0]", "eval.seeds=[0,1]", "eval.fine_tune.epochs=1",
                          "eval.fine_tune.fractions=null"))
    store = ResultsStore(cfg.results_dir)
    method = build_method(cfg, 0)
    summary = evaluate(cfg, method, random_init_subject(cfg), store, CPU)
    records = store.records()
    keys = sorted((r["protocol"], r["fraction"], r["eval_seed"]) for r in records)
    assert keys == sorted([("zero-shot", 1.0, 0)] + [(p, f, s) for p in ("linear-probe", "fine-tune")
                                                       for f in (0.1, 1.0) for s in (0, 1)])
    assert summary["encoder_passes"] == {("rsna", s): 1 for s in ("train", "val", "test")}
    for r in records:
        assert r["method"] == "random-init" and r["schema"] == 2
        boot = r["bootstrap"]
        assert len(boot["replicates"]["auc"]) == 200 and set(boot["ci"]) == set(r["metrics"])
        lo, hi = boot["ci"]["auc"]
        assert lo <= r["metrics"]["auc"] <= hi
        assert set(r["timing"]) >= {"encode_s", "total_s"}
    ft = [r for r in records if r["protocol"] == "fine-tune"]
    assert all(not any(p.suffix == ".pt" for p in (store.root / "finetune").rglob("*")) for _ in ft)
    again = evaluate(cfg, method, random_init_subject(cfg), store, CPU)
    assert again["written"] == [], "finished records are skipped"


def test_a_protocols_own_fractions_choose_its_records_and_not_their_keys(tiny_cfg):
    """Fine-tuning runs at its own `fractions` (the demo's 10%) unless they are null (eval.fractions); which
    fractions run is a schedule, so a record's key is the same either way."""
    from bench.experiment.evaluating import evaluation_plan

    plans = {}
    for own in ("[0.1]", "null"):
        cfg = tiny_cfg(extra=("eval.protocols=[linear-probe,fine-tune]", "eval.fractions=[0.1,1.0]",
                              "eval.datasets=[rsna]", f"eval.fine_tune.fractions={own}"))
        plans[own] = {(k.protocol, k.fraction): k for k in evaluation_plan(cfg, random_init_subject(cfg), True)}
    assert sorted(plans["[0.1]"]) == [("fine-tune", 0.1), ("linear-probe", 0.1), ("linear-probe", 1.0)]
    assert sorted(plans["null"]) == sorted([*plans["[0.1]"], ("fine-tune", 1.0)])
    assert plans["null"][("fine-tune", 0.1)] == plans["[0.1]"][("fine-tune", 0.1)]


def test_ablations_that_start_from_the_same_weights_share_one_random_init_baseline(tiny_cfg):
    """The baseline is keyed by the model and the method's `init_settings`, not by its training switches. Every
    shipped method's list is checked against the weights: configurations with one key build the same untrained
    evaluated weights (on this machine: their bits depend on the CPU's instruction set), and changing an
    init setting changes them."""
    from bench.core.registry import METHODS
    from bench.experiment.config import ablation_names
    from bench.experiment.evaluating import evaluated_weights_digest

    digests: dict[Subject, set[str]] = {}
    for name in METHODS.names():
        for ablation in ablation_names(name):
            cfg = tiny_cfg(name, ablation)
            method = build_method(cfg, 0)
            subject = random_init_subject(cfg, method)
            assert subject.checkpoint == {"untrained_weights_sha256": evaluated_weights_digest(method)}
            digests.setdefault(random_init_subject(cfg), set()).add(subject.checkpoint["untrained_weights_sha256"])
    assert all(len(d) == 1 for d in digests.values()), "one baseline key, different untrained weights"
    keys = {s.ablation: s for s in digests}
    assert len(digests) == len(keys) == len(METHODS.names())  # one baseline per method: its ablations share it
    assert random_init_subject(tiny_cfg("clip", seed=1)) != keys["clip"]
    for method, changes in [("clip", ["method.temperature=0.2"]), ("mmclip", ["method.temperature=0.2"]),
                            ("mmclip", ["method.contrastive=false", "method.image_masking.strategy=random"]),
                            ("supervised", ["model.image.layers=3"])]:
        cfg = tiny_cfg(method, extra=tuple(changes))
        changed = random_init_subject(cfg, build_method(cfg, 0))
        assert changed.pretrain_hash != keys[method].pretrain_hash
        assert changed.checkpoint["untrained_weights_sha256"] not in digests[keys[method]], changes


def test_bench_eval_of_a_run_folder_reproduces_the_run_records(tiny_cfg, tmp_path):
    from bench.cli import main
    from bench.experiment.chain import run_experiment

    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[linear-probe]", "eval.random_init_baseline=false",
                          "trainer.budget.steps=2"))
    store = run_experiment(cfg)
    (run_dir,) = (store.root / "runs").iterdir()
    other = tmp_path / "other"
    assert main(["eval", "--checkpoint", str(run_dir), "--results-dir", str(other), "--dataset", "rsna",
                 "--protocol", "linear-probe", "--fractions", "1", "eval.bootstrap.resamples=200"]) == 0
    (a,), (b,) = store.records(), ResultsStore(other).records()
    assert a["metrics"] == b["metrics"] and a["pretrain_hash"] == b["pretrain_hash"]
    assert a["eval_hash"] == b["eval_hash"] and a["bootstrap"]["ci"] == b["bootstrap"]["ci"]
    assert b["checkpoint"]["sha256"] == a["checkpoint"]["sha256"]
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2


def test_bench_eval_of_an_open_clip_model(tiny_cfg, tmp_path):
    import open_clip

    from bench.cli import main

    tiny_cfg()  # points the synthetic data at the session's tiny benchmark
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                                              "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-eval-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    model = open_clip.create_model("tiny-eval-clip")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "results"
    code = main(["eval", "--checkpoint", f"open_clip:tiny-eval-clip:{tmp_path / 'w.pt'}", "--open-clip-config",
                 str(path), "--results-dir", str(out), "--dataset", "rsna", "--protocol", "zero-shot",
                 "--protocol", "linear-probe", "--protocol", "fine-tune", "--fractions", "0.1,1", "data.synthetic.size=tiny",
                 "eval.fine_tune.epochs=1", "eval.bootstrap.resamples=50",
                 "eval.linear_probe.c_grid=[1.0]", "runtime.progress=false"])
    assert code == 0
    records = ResultsStore(out).records()
    assert sorted((r["protocol"], r["fraction"]) for r in records) == [
        ("fine-tune", 0.1), ("fine-tune", 1.0), ("linear-probe", 0.1), ("linear-probe", 1.0), ("zero-shot", 1.0)]
    assert all(r["method"] == "external" and r["config"]["model"]["image"]["image_size"] == 32 for r in records)

