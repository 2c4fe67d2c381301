"""MLIP's parts on tiny inputs: the transport plan, the local similarity, the integrity estimate and its use in the
loss, the sentence side of the batch, and the switches (tests/test_mmclip.py trains one step of every ablation and
checks every parameter gets a gradient; tests/test_distributed.py checks the losses across processes)."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench.core.errors import UserError
from bench.data.corpus import CorpusItem
from bench.data.sentences import split_sentences
from bench.experiment.config import ablation_change_table, ablation_note
from bench.experiment.pretraining import build_corpus, build_method
from bench.modeling.losses import integrity_contrastive_loss
from bench.modeling.transport import local_similarity, sinkhorn


def test_the_transport_plan_has_the_marginals_it_was_given():
    torch.manual_seed(0)
    cost = torch.rand(3, 5, 4) * 2
    a = torch.full((3, 5), 0.2)
    b = torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    plan = sinkhorn(cost, a, b, eps=0.05, iterations=200)
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(-2), b, atol=1e-5, rtol=0)
    assert float(plan[1, :, 2:].abs().max()) == 0.0  # nothing is moved to a sentence slot that holds none
    # a small epsilon moves each patch's mass to its cheapest sentence where the marginals allow it
    cheap = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    plan = sinkhorn(cheap, torch.full((4,), 0.25), torch.full((2,), 0.5), eps=0.01, iterations=100)
    torch.testing.assert_close(plan, 0.25 * (1 - cheap), atol=1e-4, rtol=0)


def test_a_planted_patch_sentence_match_is_found_by_the_local_similarity():
    torch.manual_seed(1)
    d = 32
    sentences = F.normalize(torch.randn(3, 2, d), dim=-1)  # three reports of two sentences
    present = torch.ones(3, 2, dtype=torch.bool)
    present[2, 1] = False  # report 2 has one sentence
    patches = F.normalize(torch.randn(2, 4, d), dim=-1)
    # image 0's patches 0-1 show report 1's first sentence, patches 2-3 its second
    patches[0] = sentences[1, torch.tensor([0, 0, 1, 1])]
    similarity, plan = local_similarity(patches, sentences, present, eps=0.02, iterations=100)
    assert similarity.shape == (2, 3)
    assert float(similarity[0, 1]) == pytest.approx(1.0, abs=1e-3)
    assert int(similarity[0].argmax()) == 1 and float(similarity[0, 1] - similarity[0, [0, 2]].max()) > 0.5
    # the plan sends each planted patch's mass 1/4 to the sentence it shows
    torch.testing.assert_close(plan[0, 1], torch.tensor([[0.25, 0], [0.25, 0], [0, 0.25], [0, 0.25]]), atol=1e-3,
                               rtol=0)
    # a report with no sentence scores 0 with every image
    none = torch.zeros(3, 2, dtype=torch.bool)
    none[:2] = True
    assert float(local_similarity(patches, sentences, none, 0.05, 20)[0][:, 2].abs().max()) == 0.0


def test_the_plan_is_a_fixed_weighting_unless_gradients_are_asked_through_it():
    torch.manual_seed(2)
    patches = F.normalize(torch.randn(2, 3, 8), dim=-1).requires_grad_()
    sentences = F.normalize(torch.randn(2, 2, 8), dim=-1)
    present = torch.ones(2, 2, dtype=torch.bool)
    for plan_grad in (False, True):
        similarity, plan = local_similarity(patches, sentences, present, 0.1, 20, plan_grad=plan_grad)
        assert plan.requires_grad == plan_grad
        (grad,) = torch.autograd.grad(similarity.sum(), patches)
        assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_integrity_weights_or_softens_the_global_loss():
    torch.manual_seed(3)
    logits_i, logits_t = torch.randn(4, 4) * 3, torch.randn(4, 4) * 3
    plain = integrity_contrastive_loss(logits_i, logits_t)
    ones = torch.ones(4)
    # equal integrity changes nothing, whether it weighs or softens
    torch.testing.assert_close(integrity_contrastive_loss(logits_i, logits_t, ones * 0.5, "weight"), plain)
    torch.testing.assert_close(integrity_contrastive_loss(logits_i, logits_t, ones, "soften"), plain)
    # weighing: the weighted mean of the pairs' own losses
    per_pair = 0.5 * (F.cross_entropy(logits_i, torch.arange(4), reduction="none")
                      + F.cross_entropy(logits_t, torch.arange(4), reduction="none"))
    w = torch.tensor([1.0, 0.1, 0.5, 0.2])
    torch.testing.assert_close(integrity_contrastive_loss(logits_i, logits_t, w, "weight"),
                               (w * per_pair).sum() / w.sum())
    # softening: the target keeps `integrity` on the partner and spreads the rest over the other rows
    target = torch.tensor([[0.1, 0.3, 0.3, 0.3]] + [[0.0] * 4] * 3)
    target[1:, 1:] = torch.eye(3)
    w = torch.tensor([0.1, 1.0, 1.0, 1.0])
    want = 0.5 * (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target))
    torch.testing.assert_close(integrity_contrastive_loss(logits_i, logits_t, w, "soften"), want)


def test_the_integrity_estimate_lies_between_its_floor_and_one(tiny_cfg):
    cfg = tiny_cfg("mlip", extra=("method.integrity.floor=0.3",))
    method = build_method(cfg, 0).eval()
    images = torch.rand(6, 1, 96, 96)
    whole = method.embed_image(images)
    assert torch.allclose(method._integrity(images, whole), torch.ones(6), atol=1e-5)  # the whole view keeps all
    integrity = method._integrity(images, F.normalize(torch.randn(6, whole.shape[1]), dim=-1))
    assert ((integrity >= 0.3) & (integrity <= 1.0)).all() and float(integrity.min()) == pytest.approx(0.3)
    integrity = method._integrity(images, -whole)  # the opposite direction: the floor, never below
    assert torch.allclose(integrity, torch.full((6,), 0.3))


def test_reports_split_into_sentences():
    report = ("Moderate left pleural effusion. The lungs are otherwise clear. A 1.5 cm nodule, e.g. the granuloma. "
              "Compared to Dr. Smith's study. Moderate left  pleural effusion.")
    assert split_sentences(report) == ["Moderate left pleural effusion.", "The lungs are otherwise clear.",
                                       "A 1.5 cm nodule, e.g. the granuloma.", "Compared to Dr. Smith's study."]
    assert len(split_sentences(report, deduplicate=False)) == 5
    assert split_sentences(report, max_sentences=2) == split_sentences(report)[:2]
    assert split_sentences("no boundary here") == ["no boundary here"] and split_sentences("  ") == []


def test_the_batch_carries_each_reports_sentences(tiny_cfg):
    cfg = tiny_cfg("mlip", extra=("method.psm.max_sentences=3",))
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    items = [corpus[i] for i in sampler.batches()[0]]
    batch = method.make_collate()(items)
    assert batch.sentence_index.shape == (len(items), 3)
    decode = method.tokenizer.hf.decode
    for row, item in enumerate(items):
        want = split_sentences(item.text, 3)
        got = [decode(batch.sentences.input_ids[k], skip_special_tokens=True)
               for k in batch.sentence_index[row] if k >= 0]
        assert got == [method.tokenizer.hf.decode(method.tokenizer([s]).input_ids[0], skip_special_tokens=True)
                       for s in want]
    # padded only to the longest sentence of the batch
    assert int(batch.sentences.attention_mask.sum(1).max()) == batch.sentences.input_ids.shape[1] <= 32
    # a prompt row (any method's collate can be handed one) gets no sentences
    prompt = CorpusItem(items[0].image, "No pneumothorax.", "x:1", "image_only", 0)
    batch = method.make_collate()([items[0], prompt])
    assert (batch.sentence_index[1] == -1).all() and (batch.sentence_index[0] >= 0).any()
    # without matching, no sentence work at all
    assert build_method(tiny_cfg("mlip", "no-psm"), 0).make_collate()(items).sentences is None


def test_switches_that_cannot_hold_together_are_refused(tiny_cfg):
    with pytest.raises(UserError, match="method.integrity.enabled=true needs method.masking.enabled=true"):
        tiny_cfg("mlip", extra=("method.masking.enabled=false", "method.mim.enabled=false"))
    with pytest.raises(UserError, match="method.mim.enabled=true needs method.masking.enabled=true"):
        tiny_cfg("mlip", extra=("method.masking.enabled=false", "method.integrity.enabled=false"))
    with pytest.raises(UserError, match="paired image-report data only"):
        tiny_cfg("mlip", extra=("method.unpaired=true",))
    with pytest.raises(UserError, match="psm.projection"):
        tiny_cfg("mlip", extra=("method.psm.projection=both",))
    with pytest.raises(UserError, match="hides no patch of 64"):
        build_method(tiny_cfg("mlip", "mask-ratio-0.0"), 0)


CLAIMS = {"no-psm": {"psm.enabled"}, "no-mim": {"mim.enabled"}, "no-integrity": {"integrity.enabled"},
          "no-masking": {"masking.enabled", "integrity.enabled", "mim.enabled"}}  # the last two follow (the file)


def test_mlip_ablations_change_exactly_the_switches_they_claim(tiny_cfg):
    table = ablation_change_table("mlip", list(CLAIMS), ["data.synthetic.size=tiny"])
    for ablation, keys in CLAIMS.items():
        assert {k.removeprefix("method.") for k in table[ablation]} == keys, ablation
        composed = tiny_cfg("mlip", ablation)
        for key, (_, new) in table[ablation].items():
            assert OmegaConf.select(composed, key) == new
    assert [a for a in CLAIMS if ablation_note("mlip", a)] == ["no-masking"]


def test_a_masked_step_encodes_only_the_visible_patches(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("mlip", extra=("method.masking.mask_ratio=0.75",))
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    batch = method.make_collate()([corpus[i] for i in sampler.batches()[0]])
    seen = []
    forward = type(method.image_tower).forward

    def spy(tower, images, keep=None):
        seen.append(None if keep is None else keep.shape[1])
        return forward(tower, images, keep)

    monkeypatch.setattr(type(method.image_tower), "forward", spy)
    out = method.train().training_step(batch)
    # the masked view with a quarter of the 64 patches, and one pass without gradient over the whole image
    # (the integrity estimate)
    assert seen == [16, None]
    assert float(out.parts["masked_patches"]) == pytest.approx(0.75)
    assert 0.1 <= float(out.parts["integrity"]) <= 1.0
