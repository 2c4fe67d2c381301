import json

import pytest
import torch
from omegaconf import OmegaConf

from bench.cli import main
from bench.core.results import ResultsStore
from bench.data.batch import TextBatch
from bench.experiment.config import (
    ablation_change_table,
    ablation_changes,
    ablation_names,
    ablation_note,
    ablation_parameters,
    compose_config,
)
from bench.experiment.evaluating import evaluate, subject_of_run
from bench.experiment.pretraining import build_corpus, build_method, pretrain

# text-only rows too, so one batch holds every kind of sample
ALL_KINDS = ("data.corpus.text_only=[mimic-cxr]",)

EXPECTED_LOSSES = {
    ("clip", "none"): {"itc"}, ("clip", "fixed-temperature"): {"itc"}, ("clip", "frozen-text"): {"itc"},
    ("clip", "shuffled-pairs"): {"itc"},
    ("mmclip", "none"): {"itc", "mim", "mlm"}, ("mmclip", "no-attmim"): {"itc", "mlm"},
    ("mmclip", "random-mask"): {"itc", "mim", "mlm"}, ("mmclip", "paired-only"): {"itc", "mim", "mlm"},
    ("mmclip", "no-entmlm"): {"itc", "mim"}, ("mmclip", "no-prompts"): {"itc", "mim", "mlm"},
    ("mmclip", "attmim-share-0.5"): {"itc", "mim", "mlm"}, ("mrm", "none"): {"mim", "mlm"},
    ("mmclip", "random-image-mask"): {"itc", "mim", "mlm"}, ("mmclip", "random-text-mask"): {"itc", "mim", "mlm"},
    ("mmclip", "entmlm-full-image"): {"itc", "mim", "mlm"},
    ("mmclip", "paired-prompts"): {"itc", "itc_prompt", "mim", "mlm"},
    ("mlip", "none"): {"itc", "psm", "mim"}, ("mlip", "no-psm"): {"itc", "mim"}, ("mlip", "no-mim"): {"itc", "psm"},
    ("mlip", "no-masking"): {"itc", "psm"}, ("mlip", "no-integrity"): {"itc", "psm", "mim"},
}


def _first_batch(cfg, method):
    corpus, sampler, summary = build_corpus(cfg, 0)
    return method.make_collate()([corpus[i] for i in sampler.batches()[0]]), summary


def test_every_method_and_ablation_is_covered(tiny_cfg):
    from bench.core.registry import METHODS

    named = {(m, a) for m in METHODS.names() for a in ablation_names(m)}
    assert named - {("supervised", "none")} <= set(EXPECTED_LOSSES)  # tests/test_controls.py trains supervised


@pytest.mark.parametrize("method_name,ablation", sorted(EXPECTED_LOSSES))
def test_one_step_trains_exactly_the_claimed_losses_and_every_parameter(tiny_cfg, method_name, ablation):
    cfg = tiny_cfg(method_name, ablation, extra=ALL_KINDS)
    method = build_method(cfg, 0)
    batch, summary = _first_batch(cfg, method)
    method.train()
    out = method.training_step(batch)
    assert torch.isfinite(out.loss)
    losses = {k for k in out.parts if k in ("itc", "itc_prompt", "psm", "mim", "mlm")}
    assert losses == EXPECTED_LOSSES[(method_name, ablation)]
    assert all(float(out.parts[k]) > 0 for k in losses)
    out.loss.backward()

    uses_unpaired = bool(cfg.method.get("unpaired", False))
    assert set(summary) == ({"paired", "image_only", "text_only"} if uses_unpaired else {"paired"})
    has_text = batch.image_text >= 0
    if uses_unpaired and not cfg.method.prompts.enabled:
        assert (~has_text).sum() == summary["image_only"]["per_batch"]  # image-only rows carry no text
    elif uses_unpaired:
        assert has_text.all()
    text_only_rows = int((batch.text_image() < 0).sum()) if batch.text is not None else 0
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        # the learned "nothing" token of a decoder is only attended to by rows without the other modality
        if name == "image_decoder.memory.null" and bool(has_text.all()):
            continue
        if name == "text_decoder.memory.null" and text_only_rows == 0:
            continue
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"{method_name}/{ablation}: {name} gets no gradient"


def test_the_visible_view_trains_itc_on_the_masked_image(tiny_cfg):
    cfg = tiny_cfg("mmclip", extra=("method.image_masking.contrastive_view=visible",))
    method = build_method(cfg, 0)
    batch, _ = _first_batch(cfg, method)
    out = method.training_step(batch)
    assert {"itc", "mim", "mlm"} <= set(out.parts)
    out.loss.backward()
    assert all(p.grad is not None for n, p in method.named_parameters() if n.startswith(("image_tower", "image_proj")))


# what each named ablation changes; every other key of the composed config stays (ablation_changes diffs them all)
CLAIMS = {
    "no-attmim": {"image_masking.enabled", "text_masking.decoder_image"},  # the second follows (its file says so)
    "random-mask": {"image_masking.strategy", "text_masking.strategy"},
    "random-image-mask": {"image_masking.strategy"}, "random-text-mask": {"text_masking.strategy"},
    "entmlm-full-image": {"text_masking.decoder_image"},
    "paired-only": {"unpaired", "prompts.enabled"}, "no-entmlm": {"text_masking.enabled"},
    "no-prompts": {"prompts.enabled"}, "paired-prompts": {"prompts.paired"},
    "attmim-share-0.25": {"image_masking.attention_share"},
}


def test_ablations_change_exactly_the_switches_they_claim(tiny_cfg):
    assert set(ablation_names("mmclip")) - {"none"} <= set(CLAIMS)
    table = ablation_change_table("mmclip", list(CLAIMS), ["data.synthetic.size=tiny"])
    for ablation, switches in CLAIMS.items():
        assert set(table[ablation]) == {f"method.{k}" for k in switches}, ablation
        composed = tiny_cfg("mmclip", ablation)
        assert composed.ablation == ablation
        for key, (_, new) in table[ablation].items():
            assert OmegaConf.select(composed, key) == new
    # two keys where the file says what follows, one elsewhere
    assert [a for a in CLAIMS if ablation_note("mmclip", a)] == \
        ["no-attmim", "random-mask", "random-image-mask", "random-text-mask", "paired-only"]
    assert ablation_changes("mmclip", "none") == {}
    assert tiny_cfg("mmclip", "attmim-share-0.25").method.image_masking.attention_share == 0.25
    assert tiny_cfg("mmclip", "random-mask").method.image_masking.mask_ratio == \
        tiny_cfg("mmclip").method.image_masking.mask_ratio


def test_unknown_ablations_name_the_valid_ones(tiny_cfg):
    from bench.core.errors import UserError

    with pytest.raises(UserError, match="attmim-share-<number>"):
        tiny_cfg("mmclip", "attmim-share-lots")
    with pytest.raises(UserError, match="no-attmim"):
        tiny_cfg("mmclip", "no-such-thing")


def test_mrm_is_masked_modelling_without_contrast_on_paired_data(tiny_cfg):
    cfg = tiny_cfg("mrm")
    m = cfg.method
    assert not m.contrastive and not m.unpaired and m.image_masking.strategy == "random"
    assert m.text_masking.strategy == "random" and m.text_masking.conditioning == "pooled-latent"
    method = build_method(cfg, 0)
    assert not method.joint_space and not hasattr(method, "image_proj")
    # MRM's image decoder reads no text; its MLM sees the image as one pooled latent, through no text decoder
    assert method.image_decoder.memory is None and not hasattr(method, "text_decoder")
    assert hasattr(method, "image_latent")
    assert ablation_parameters("mrm") == {"mask-ratio": "image_masking.mask_ratio"}  # its masks are random


def test_attention_scores_follow_the_text(tiny_cfg):
    """A patch whose projected feature points where the report's word-pieces point gets the top score;
    cross-attention scores are a distribution over patches and ignore padding."""
    method = build_method(tiny_cfg("mmclip"), 0).eval()
    text = method.tokenizer(["small right pleural effusion"])
    with torch.no_grad():
        pooled, tokens = method.text_tower(text)
        words = method.text_proj(tokens[0, 1:text.attention_mask.sum() - 1]).mean(0)
        patches = 0.01 * torch.randn(1, method.image_tower.num_patches, method.image_tower.width)
        patches[0, 5] = torch.linalg.pinv(method.image_proj.weight) @ (words / words.norm() * 20)
        for source in ("cross-attention", "global"):
            method.cfg.method.image_masking.attention_source = source
            scores = method.patch_scores(patches, tokens, text, pooled)
            assert int(scores[0].argmax()) == 5, source
        method.cfg.method.image_masking.attention_source = "cross-attention"
        scores = method.patch_scores(patches, tokens, text, pooled)
        assert float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
        longer = TextBatch(torch.cat([text.input_ids, torch.zeros(1, 5, dtype=torch.long)], 1),
                           torch.cat([text.attention_mask, torch.zeros(1, 5, dtype=torch.long)], 1))
        pooled2, tokens2 = method.text_tower(longer)
        again = method.patch_scores(patches, tokens2, longer, pooled2)
        assert torch.allclose(scores, again, atol=1e-5)


def test_mmclip_run_logs_its_losses_and_corpus_and_is_deterministic(tiny_cfg, tmp_path):
    finals = []
    for name in ("a", "b"):
        cfg = tiny_cfg("mmclip", extra=("trainer.budget.steps=2", f"results_dir={tmp_path / name}"))
        _, final = pretrain(cfg, ResultsStore(cfg.results_dir), torch.device("cpu"))
        finals.append(torch.load(final, weights_only=False)["model"])
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"itc", "mim", "mlm", "masked_patches", "masked_tokens"} <= set(rows[0])
    corpus = json.loads((final.parent / "corpus.json").read_text())
    # the data config's sources, and trainer.batch_size paired rows with the unpaired ones on top
    assert corpus["paired"]["sources"] == ["mimic-cxr"]
    assert corpus["image_only"]["sources"] == list(cfg.data.corpus.image_only)
    assert corpus["paired"]["per_batch"] == 16 and corpus["image_only"]["per_batch"] > 0
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_a_method_without_a_joint_space_skips_zero_shot(tiny_cfg):
    cfg = tiny_cfg("mrm", extra=("trainer.budget.steps=1", "eval.datasets=[rsna]",
                                 "eval.protocols=[zero-shot,linear-probe]"))
    store = ResultsStore(cfg.results_dir)
    method, final = pretrain(cfg, store, torch.device("cpu"))
    summary = evaluate(cfg, method, subject_of_run(cfg, final), store, torch.device("cpu"))
    assert [r["protocol"] for r in store.records()] == ["linear-probe"] and len(summary["written"]) == 1


def test_bench_mask_json_for_a_report(data_home, capsys):
    report = "Loculated right pleural effusion with basilar atelectasis. No pneumothorax."
    assert main(["mask", "--report", report, "--json", "data.synthetic.size=tiny"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["words"] == report.split()
    assert len(view["masked"]) == len(view["words"]) and any(view["masked"])
    assert all(0 <= s < e <= len(view["words"]) and t in ("finding", "anatomy", "laterality", "modifier")
               for s, e, t in view["entities"])
    found = {" ".join(view["words"][s:e]).strip("."): t for s, e, t in view["entities"]}
    assert found.get("effusion") == "finding" and found.get("right") == "laterality"
    negated = [n for (s, e, t), n in zip(view["entities"], view["negated"]) if "pneumothorax" in view["words"][s]]
    assert negated == [True]


def test_bench_mask_png_for_a_dataset_sample(data_home, tmp_path, tiny_cfg, capsys):
    from PIL import Image

    from bench.data.loading import load_dataset

    cfg = tiny_cfg("mmclip")
    sample = load_dataset(cfg, "mimic-cxr", with_reports=True).manifest["sample_id"].iloc[0]
    png = tmp_path / "mask.png"
    assert main(["mask", "--dataset", "mimic-cxr", "--sample", str(sample), "--out", str(png), "--json",
                 "data.synthetic.size=tiny"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["scored"] and view["masked_patches"] == 48 and view["patches"] == 64
    with Image.open(png) as im:
        assert im.size == (3 * 96 + 8, 96)
    assert main(["mask", "--dataset", "mimic-cxr", "data.synthetic.size=tiny"]) == 2  # no --sample: one-line error


def test_compose_records_the_parametric_ablation():
    cfg = compose_config("mmclip", "mask-ratio-0.6", 0, ["data.synthetic.size=tiny"])
    assert cfg.ablation == "mask-ratio-0.6" and cfg.method.image_masking.mask_ratio == 0.6
