"""The positive and the negative control: `supervised` (the image tower trained on the corpus's labels, no text)
and clip's `shuffled-pairs` ablation (every report paired with another study's image, re-drawn every epoch)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from PIL import Image
from torch.utils.data import DataLoader

from bench.cli import main
from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.results import ResultsStore
from bench.data.corpus import Pool, PretrainCorpus, derangement
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache
from bench.data.loading import dataset_root
from bench.datasets.chexpert import COMPETITION
from bench.experiment.evaluating import evaluation_protocols
from bench.experiment.identity import pretrain_hash
from bench.experiment.pretraining import build_corpus, build_method, pretrain
from bench.methods.supervised import Supervised, label_targets

FEW_STEPS = ("trainer.budget.steps=2", "trainer.warmup_steps=1")


# --- supervised ------------------------------------------------------------------------------------------------
def test_supervised_trains_its_image_tower_on_the_shared_trainer_and_is_evaluated_without_zero_shot(tiny_cfg):
    extra = (*FEW_STEPS, "eval.datasets=[rsna]", "eval.random_init_baseline=false",
             "eval.protocols=[zero-shot,linear-probe,fine-tune]")
    cfg = tiny_cfg("supervised", extra=extra)
    assert cfg.method.name == "supervised" and len(cfg.method.labels) == 14 and cfg.method.uncertain == "ignore"
    assert not Supervised.has_joint_space(cfg)
    assert evaluation_protocols(cfg, False) == ["linear-probe", "fine-tune"]  # zero-shot skipped, as for MRM
    initial = build_method(cfg, cfg.seed).state_dict()
    assert main(["run", "--method", "supervised", "--results-dir", cfg.results_dir, "--no-table", *TINY, *extra]) == 0
    records = {r["protocol"]: r for r in ResultsStore(cfg.results_dir).records()}
    assert set(records) == {"linear-probe", "fine-tune"}
    assert all(0 <= r["metrics"]["auc"] <= 1 for r in records.values())
    (final,) = Path(cfg.results_dir).rglob("final.pt")
    trained = torch.load(final, map_location="cpu", weights_only=False)["model"]
    assert {n.split(".")[0] for n in trained} == {"image_tower", "head"}  # no text tower at all
    changed = [k for k, v in trained.items() if k.startswith("image_tower.") and not torch.equal(v, initial[k])]
    assert len(changed) > 10 and all(torch.isfinite(v).all() for v in trained.values())


def test_supervised_loss_is_finite_and_falls_on_a_batch_it_fits(tiny_cfg):
    cfg = tiny_cfg("supervised")
    method = build_method(cfg, 0)
    corpus, sampler, summary = build_corpus(cfg, 0)
    assert set(summary) == {"paired", "image_only"}
    batch = method.make_collate()([corpus[i] for i in sampler.batches()[0]])
    assert batch.text is None and batch.images.shape[0] == len(batch) == 16 + 8  # paired rows, image-only on top
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        out = method.training_step(batch)
        losses.append(float(out.loss.detach()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    assert float(out.parts["bce"]) == pytest.approx(losses[-1]) and 0 < float(out.parts["labelled"]) < 1


def test_an_unlabelled_batch_trains_nothing(tiny_cfg):
    cfg = tiny_cfg("supervised")
    method = build_method(cfg, 0)
    corpus, _, _ = build_corpus(cfg, 0)
    # a stand-in item without label values (as `bench profile` builds): every head masked
    batch = method.make_collate()([corpus[0]._replace(heads=None), corpus[1]._replace(heads=None)])
    assert not batch.label_mask.any()
    out = method.training_step(batch)
    out.loss.backward()
    assert float(out.loss.detach()) == 0 and all(float(p.grad.abs().sum()) == 0 for p in method.parameters())


def _raw(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"Path": str})


def test_batch_labels_follow_the_policy_for_a_mimic_and_a_chexpert_sample(tiny_cfg):
    # CheXpert as the image-only source (PadChest is the default): its 5 labels leave 9 heads unlabelled
    cfg = tiny_cfg("supervised", extra=("data.corpus.image_only=[chexpert]",))
    heads = list(cfg.method.labels)
    method = build_method(cfg, 0)
    corpus, _, _ = build_corpus(cfg, 0)
    collate = method.make_collate()

    def labels_of(kind: str, sample_id: str) -> tuple[dict, dict]:
        i = corpus.offsets[kind] + corpus.pools[kind].ids.index(sample_id)
        batch = collate([corpus[i]])
        assert batch.sample_ids == [sample_id]
        return dict(zip(heads, batch.labels[0].tolist())), dict(zip(heads, batch.label_mask[0].tolist()))

    # MIMIC-CXR: the study's row of the labeler CSV, read here without the adapter
    mimic = dataset_root(cfg, "mimic-cxr")
    raw = _raw(mimic / "mimic-cxr-2.0.0-chexpert.csv").set_index("study_id")
    study_of = _raw(mimic / "mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")["study_id"]
    pool = corpus.pools["paired"]
    picked = next(s for s in pool.ids if {1.0, -1.0} <= set(raw.loc[study_of[s.split(":", 1)[1]], heads])
                  and raw.loc[study_of[s.split(":", 1)[1]], heads].isna().any())
    row = raw.loc[study_of[picked.split(":", 1)[1]], heads]
    targets, mask = labels_of("paired", picked)
    for h, v in row.items():
        if v == -1:
            assert not mask[h], h  # uncertain: ignored
        else:
            assert mask[h] and targets[h] == (1.0 if v == 1 else 0.0), (h, v)  # blank: 0, not mentioned

    # CheXpert: train.csv's row; its adapter keeps the 5 competition labels, so the other heads are masked
    chexpert = dataset_root(cfg, "chexpert")
    raw = _raw(chexpert / "train.csv")
    raw.index = raw["Path"].str.split("/", n=1).str[1]
    pool = corpus.pools["image_only"]
    picked = next(s for s in pool.ids if (raw.loc[s.split(":", 1)[1], COMPETITION] == -1).any()
                  and raw.loc[s.split(":", 1)[1], COMPETITION].isna().any())
    row = raw.loc[picked.split(":", 1)[1]]
    targets, mask = labels_of("image_only", picked)
    assert not any(mask[h] for h in heads if h not in COMPETITION)
    for h in COMPETITION:
        if row[h] == -1:
            assert not mask[h], h
        else:
            assert mask[h] and targets[h] == (1.0 if row[h] == 1 else 0.0), (h, row[h])


def test_the_uncertain_policy_and_its_check():
    values = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    expected = {"ignore": ([1, 0, 0, 0], [1, 1, 0, 0]), "zeros": ([1, 0, 0, 0], [1, 1, 1, 0]),
                "ones": ([1, 0, 1, 0], [1, 1, 1, 0])}
    for policy, (targets, valid) in expected.items():
        t, v = label_targets(values, policy)
        assert t[0].tolist() == targets and v[0].astype(int).tolist() == valid, policy
    from bench.experiment.config import compose_config

    with pytest.raises(UserError, match="method.uncertain"):
        compose_config("supervised", overrides=["method.uncertain=maybe"])
    with pytest.raises(UserError, match="method.pairing"):
        compose_config("clip", overrides=["method.pairing=random"])


# --- shuffled pairs ---------------------------------------------------------------------------------------------
def test_a_derangement_never_pairs_a_sample_with_its_own_group():
    groups = np.array([0, 0, 0, 1, 2, 3, 3, 4, 5, 6])
    seen = set()
    for seed in range(20):
        p = derangement(groups, np.random.default_rng(seed))
        assert sorted(p.tolist()) == list(range(10))  # a permutation
        assert (groups[p] != groups).all()
        seen.add(tuple(p))
    assert len(seen) == 20
    assert (derangement(np.arange(2), np.random.default_rng(0)) == [1, 0]).all()
    with pytest.raises(UserError, match="at most half"):
        derangement(np.array([0, 0, 0, 1, 2]), np.random.default_rng(0))


def _corpus(tmp_path, seed: int = 0, pairing: str = "shuffled") -> PretrainCorpus:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
        paths.append(str(path))
    reports = [f"Report of study {i // 2 if i < 2 else i}." for i in range(8)]  # images 0 and 1: one study
    pools = {"paired": Pool("paired", ["a"], [f"p{i}" for i in range(8)], paths, reports)}
    return PretrainCorpus(pools, ImagePreprocessor(32, 0.5, 0.25, False), ImageCache(None, 32), seed=seed,
                          pairing=pairing)


def test_shuffled_pairing_is_a_derangement_redrawn_every_epoch_and_reproducible(tmp_path):
    own = [_corpus(tmp_path, pairing="matched")[i][1] for i in range(8)]
    assert own[0] == own[1] == "Report of study 0." and len(set(own)) == 7
    corpus = _corpus(tmp_path)
    by_epoch = []
    for epoch in range(3):
        corpus.set_epoch(epoch)
        texts = [corpus[i][1] for i in range(8)]
        assert all(t != o for t, o in zip(texts, own)), epoch  # no image keeps its own report
        assert sorted(texts) == sorted(own)  # every report still used once
        assert [corpus[i][2] for i in range(8)] == [f"p{i}" for i in range(8)]  # the image keeps its id
        by_epoch.append(texts)
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    other = _corpus(tmp_path)  # a second instance (a resumed run) at the same epoch: the same pairs
    other.set_epoch(1)
    assert [other[i][1] for i in range(8)] == by_epoch[1]
    corpus.set_epoch(0)
    assert [corpus[i][1] for i in range(8)] == by_epoch[0]
    assert [_corpus(tmp_path, seed=1)[i][1] for i in range(8)] != by_epoch[0]
    # loader workers each get the corpus of the epoch and read the same pairs
    corpus.set_epoch(2)
    loader = DataLoader(corpus, batch_sampler=[[0, 1, 2, 3], [4, 5, 6, 7]], collate_fn=list, num_workers=2)
    assert [it[1] for batch in loader for it in batch] == by_epoch[2]


def test_shuffled_pairs_ablation_is_clip_with_one_switch_and_trains(tiny_cfg):
    base, cfg = tiny_cfg("clip"), tiny_cfg("clip", "shuffled-pairs", extra=FEW_STEPS)
    assert base.method.pairing == "matched" and cfg.method.pairing == "shuffled"
    a, b = to_plain(base), to_plain(tiny_cfg("clip", "shuffled-pairs"))
    assert {k for k in a["method"] if a["method"][k] != b["method"][k]} == {"pairing"}
    assert {k: v for k, v in a.items() if k not in ("method", "ablation")} == \
        {k: v for k, v in b.items() if k not in ("method", "ablation")}
    assert pretrain_hash(tiny_cfg("clip", "shuffled-pairs")) != pretrain_hash(base)  # its own row and checkpoint
    corpus, _, _ = build_corpus(cfg, 0)
    matched, _, _ = build_corpus(base, 0)
    n = corpus.sizes["paired"]
    assert all(corpus[i][1] != matched[i][1] for i in range(n))
    method, final = pretrain(cfg, ResultsStore(cfg.results_dir), torch.device("cpu"))
    assert final.exists()
    assert torch.isfinite(torch.stack([p.detach().sum() for p in method.parameters()])).all()
