"""The segmentation and retrieval protocols: their metrics against hand counts, empty masks, numbers that
recompute from the stored predictions, retrieval over the whole split, and both protocols through `bench eval`,
the table, the plots, the plan and a sweep's objective."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from tests_support import run_dir_of

from bench.cli import main
from bench.core.errors import UserError
from bench.core.registry import PROTOCOLS
from bench.data.finding_masks import input_mask
from bench.evaluation.protocols.retrieval import first_hit_ranks, hits_at, per_query_values
from bench.evaluation.protocols.segmentation import mask_scores, scores_from_predictions, selection_score
from bench.evaluation.result import SampleMeanResult
from bench.experiment.evaluating import Subject, evaluation_plan
from bench.tools.sweep.spec import Objective


def test_dice_iou_and_dice_on_positives_against_hand_counts():
    truth = np.zeros((4, 4, 4), bool)
    pred = np.zeros((4, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 true pixels
    pred[0, :2, :1] = True  # 2 predicted, both inside: Dice 2*2/(4+2), IoU 2/4
    pred[1, 0, 0] = True  # empty truth, one false pixel: Dice 0, IoU 0
    truth[3, 0, :] = True  # 4 true pixels, nothing predicted: Dice 0; image 2 is empty and predicted empty: 1
    scores = mask_scores(truth, pred)
    np.testing.assert_allclose(scores["dice"], [4 / 6, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(scores["iou"], [0.5, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(scores["dice_pos"], [4 / 6, np.nan, np.nan, 0.0])
    boot = OmegaConf.create({"resamples": 50, "seed": 0, "confidence": 0.95})
    numbers = SampleMeanResult(scores, ["a", "b", "c", "d"], pd.DataFrame(), 4).numbers(boot)
    assert numbers["metrics"]["dice"] == pytest.approx((4 / 6 + 1) / 4)
    assert numbers["metrics"]["dice_pos"] == pytest.approx((4 / 6) / 2)  # over the two images with a finding
    assert numbers["metrics"]["iou"] == pytest.approx(1.5 / 4)
    lo, hi = numbers["bootstrap"]["ci"]["dice"]
    assert 0 <= lo <= numbers["metrics"]["dice"] <= hi <= 1
    assert len(numbers["bootstrap"]["replicates"]["dice_pos"]) == 50


def test_the_default_epoch_selection_prefers_no_degenerate_prediction():
    # a val split of mostly negatives: 1 image with a 4-pixel finding, 3 without
    truth = np.zeros((4, 4, 4), bool)
    truth[0, :2, :2] = True
    nothing, everywhere, found = np.zeros_like(truth), np.ones_like(truth), truth.copy()
    half = truth.copy()
    half[0, 0, :2] = False  # half the finding, nothing elsewhere
    assert selection_score(truth, nothing, "pooled") == 0.0
    assert selection_score(truth, everywhere, "pooled") == pytest.approx(2 * 4 / (4 + 64))
    assert selection_score(truth, half, "pooled") == pytest.approx(2 * 2 / (4 + 2))
    assert selection_score(truth, found, "pooled") == 1.0
    # why pooled is the default: the per-image rules credit degenerate predictions (nothing scores 0.5 balanced and
    # beats everywhere on the headline Dice; dice_pos cannot see false positives on negatives)
    assert selection_score(truth, nothing, "dice") > selection_score(truth, everywhere, "dice")
    assert selection_score(truth, nothing, "balanced") == 0.5
    assert selection_score(truth, half, "balanced") == pytest.approx((2 / 3 + 1) / 2)
    assert selection_score(truth, everywhere, "dice_pos") == pytest.approx(2 * 4 / (4 + 16))  # blind to negatives
    assert np.isnan(selection_score(np.zeros_like(truth), nothing, "pooled"))
    assert PROTOCOLS.get("segmentation").defaults["select_on"] == "pooled"


def test_recall_and_precision_at_k_against_hand_counts():
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.6, 0.1]])
    relevant = np.eye(3, dtype=bool)
    # query 0's item ranks 1st; query 1's (0.3) after 0.8: 2nd; query 2's (0.1) after 0.6, 0.4: 3rd
    np.testing.assert_array_equal(first_hit_ranks(similarity, relevant), [1, 2, 3])
    values = per_query_values({"i2t": pd.DataFrame({"first_hit": [1, 2, 3]})}, [1, 2])
    np.testing.assert_allclose(values["i2t_r@1"], [1, 0, 0])
    np.testing.assert_allclose(values["i2t_r@2"], [1, 1, 0])
    # several relevant items: the best-ranked one counts
    np.testing.assert_array_equal(first_hit_ranks(similarity, np.array([[0, 1, 1]] * 3, bool)), [2, 1, 1])
    # ties count against the query: an irrelevant item as similar as the hit ranks first
    np.testing.assert_array_equal(first_hit_ranks(np.array([[0.5, 0.5, 0.5]]), np.array([[False, True, True]])), [2])
    classes = np.array([0, 0, 1, 1, 1])
    sim = -np.abs(np.arange(5)[:, None] - np.arange(5)[None, :]).astype(float)
    np.fill_diagonal(sim, -np.inf)
    hits = hits_at(sim, classes[:, None] == classes[None, :], [1, 2])
    # ties count against the query: query 1's nearest are 0 (its class) and 2 (not), query 2's 1 (not) and 3
    np.testing.assert_array_equal(hits[1], [1, 0, 0, 1, 1])
    np.testing.assert_array_equal(hits[2], [1, 1, 1, 2, 2])


def test_a_mask_reaches_the_input_as_the_image_does():
    mask = np.zeros((40, 80), bool)  # a wide image: resized to 8 x 4 rows, padded 2 rows above and below
    mask[:, 40:] = True
    out = input_mask(mask, 8)
    assert out.shape == (8, 8)
    assert not out[:2].any() and not out[6:].any()  # padding is never on a finding
    assert out[2:6, 4:].all() and not out[2:6, :4].any()


def test_segmentation_and_retrieval_run_only_where_their_data_are(tiny_cfg):
    cfg = tiny_cfg("clip", extra=("eval.protocols=[zero-shot,segmentation,retrieval]",
                                  "eval.datasets=[siim,rsna,chexpert,mimic-cxr,chexpert-5x200]"))
    subject = Subject("clip", "none", "h", 0, None, "k")
    planned = {(k.dataset, k.protocol) for k in evaluation_plan(cfg, subject, True)}
    assert {d for d, p in planned if p == "segmentation"} == {"siim", "rsna"}
    assert {d for d, p in planned if p == "retrieval"} == {"mimic-cxr", "chexpert-5x200"}
    # retrieval's own datasets, whatever eval.datasets holds; null: eval.datasets, of those it applies to
    cfg = tiny_cfg("clip", extra=("eval.protocols=[retrieval,segmentation]",))
    assert [(k.dataset, k.protocol) for k in evaluation_plan(cfg, subject, True)] == [
        ("rsna", "segmentation"), ("siim", "segmentation"), ("mimic-cxr", "retrieval"), ("chexpert-5x200", "retrieval")]
    cfg = tiny_cfg("clip", extra=("eval.protocols=[retrieval]", "eval.retrieval.datasets=null"))
    assert evaluation_plan(cfg, subject, True) == []
    with pytest.raises(UserError, match=r"eval.retrieval.datasets\[0\]='nope' is not valid"):
        tiny_cfg("clip", extra=("eval.retrieval.datasets=[nope]",))
    assert PROTOCOLS.get("segmentation").is_metric("dice") and not PROTOCOLS.get("segmentation").is_metric("auc")
    assert PROTOCOLS.get("retrieval").is_metric("t2i_r@5") and not PROTOCOLS.get("retrieval").is_metric("r@5")
    assert Objective.parse("siim:segmentation:dice:0.1", ["chexpert"]).metric == "dice"
    with pytest.raises(UserError, match="needs a dataset that provides masks; chexpert does not"):
        Objective.parse("chexpert:segmentation:dice", ["chexpert"])
    with pytest.raises(UserError, match="segmentation has no metric 'auc'"):
        Objective.parse("siim:segmentation:auc", ["chexpert"])


def _records(results: Path, protocol: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob(f"records/*/*__{protocol}__*.json"))]


def test_segmentation_and_retrieval_through_bench_eval_table_and_plot(data_home, tmp_path, tiny_cfg, capsys):
    from conftest import TINY

    results = tmp_path / "results"
    assert main(["run", "--method", "clip", "--no-table", "--results-dir", str(results), *TINY,
                 "trainer.budget.epochs=1", "eval.protocols=[zero-shot]", "eval.datasets=[siim]",
                 "eval.random_init_baseline=false"]) == 0
    run = run_dir_of(results)
    common = ["--results-dir", str(results), "data.synthetic.size=tiny", "eval.batch_size=3",
              "eval.segmentation.epochs=2", "eval.segmentation.batch_size=8", "eval.bootstrap.resamples=50",
              "eval.retrieval.ks=[1,2]"]
    assert main(["eval", "--checkpoint", str(run), "--dataset", "siim,mimic-cxr,chexpert-5x200", "--protocol",
                 "segmentation,retrieval", "--fractions", "1", *common]) == 0
    (seg,) = _records(results, "segmentation")
    assert set(seg["metrics"]) == {"dice", "dice_pos", "iou"} and seg["dataset"] == "siim"
    assert seg["chosen"]["best_epoch"] in (1, 2)
    assert len(seg["chosen"]["val_score_by_epoch"]) == seg["chosen"]["epochs_run"]
    # every number recomputes from the stored predictions (the masks as run-length codes)
    pred = pd.read_csv(results / "records" / "clip" / seg["predictions_file"],
                       dtype={"sample_id": str, "true_rle": str, "pred_rle": str})
    assert len(pred) == seg["n_test"]
    recomputed = scores_from_predictions(pred, seg["chosen"]["mask_size"])
    for metric, values in recomputed.items():
        assert seg["metrics"][metric] == pytest.approx(float(np.nanmean(values)))
    assert seg["positives"]["test"] == int((pred["true_pixels"] > 0).sum()) > 0
    assert (pred["true_rle"] == "-1").sum() > 0  # empty masks are stored as SIIM writes them

    retrieval = {r["dataset"]: r for r in _records(results, "retrieval")}
    paired = retrieval["mimic-cxr"]
    assert set(paired["metrics"]) == {"i2t_r@1", "i2t_r@2", "t2i_r@1", "t2i_r@2"}
    # over the whole split, although images were encoded three at a time
    from bench.data.loading import load_dataset

    test = load_dataset(tiny_cfg("clip"), "mimic-cxr", with_reports=True).rows("test")
    assert paired["n_test"] == {"i2t": len(test), "t2i": test["report"].nunique()} and len(test) > 3
    pred = pd.read_csv(results / "records" / "clip" / paired["predictions_file"])
    recomputed = per_query_values({d: g for d, g in pred.groupby("direction")}, [1, 2])
    for metric, values in recomputed.items():
        assert paired["metrics"][metric] == pytest.approx(values.mean())
    assert set(retrieval["chexpert-5x200"]["metrics"]) == {"i2i_p@1", "i2i_p@2"}
    # K must leave items to miss: Recall@K over K or fewer items is 1 by construction
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--dataset", "mimic-cxr", "--protocol", "retrieval",
                 *common, "eval.retrieval.ks=[1000]"]) == 2
    assert "items to retrieve, not more than K=1000" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["table", "--results-dir", str(results), "--protocol", "segmentation", "--metric", "dice"]) == 0
    table = capsys.readouterr().out
    assert "siim" in table and f"{seg['metrics']['dice']:.3f}" in table
    assert main(["plot", "--results-dir", str(results), "--kind", "masks", "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "masks_siim_f1.png").stat().st_size > 10_000
