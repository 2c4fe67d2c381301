import math

import numpy as np
import pytest
import torch

from bench.core.errors import UserError
from bench.modeling.entities import STOP_WORDS, tag_entities, word_spans
from bench.modeling.label_prompts import label_prompt
from bench.modeling.masking import IGNORE, TextMasker, attention_scores, mask_counts, select_patches
from bench.modeling.towers import Tokenizer

TEMPLATES = {"positive": "There is {finding}.", "uncertain": "There may be {finding}.",
             "negative": "No {finding}.", "normal": "No acute cardiopulmonary abnormality."}
REPORT = ("Loculated right pleural effusion with basilar atelectasis. No pneumothorax. "
          "The heart size is mildly enlarged.")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("bundled-minilm", 64)


def test_attmim_share_one_hides_exactly_the_top_scoring_patches():
    torch.manual_seed(0)
    scores = torch.rand(6, 64)
    mask = select_patches(scores, 6, 64, ratio=0.5, share=1.0, min_visible=4)
    for row in range(6):
        top = set(scores[row].topk(32).indices.tolist())
        assert set(mask.masked[row].nonzero().squeeze(1).tolist()) == top
        assert set(mask.keep[row].tolist()) == set(range(64)) - top
    assert torch.equal(mask.keep, mask.keep.sort(dim=1).values)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75])
def test_attmim_partial_share_takes_the_top_patches_and_random_others(share):
    torch.manual_seed(1)
    scores = torch.rand(8, 64)
    mask = select_patches(scores, 8, 64, ratio=0.75, share=share, min_visible=4)
    hidden, by_score = mask_counts(64, 0.75, share, 4)
    assert (hidden, by_score) == (48, round(share * 48))
    assert (mask.masked.sum(1) == hidden).all() and mask.keep.shape == (8, 64 - hidden)
    for row in range(8):
        top = set(scores[row].topk(by_score).indices.tolist()) if by_score else set()
        chosen = set(mask.masked[row].nonzero().squeeze(1).tolist())
        assert top <= chosen
        # the rest is random, not simply the next-best scores
        if by_score < hidden:
            assert chosen != set(scores[row].topk(hidden).indices.tolist())


def test_masks_are_per_sample_and_keep_the_minimum_visible():
    torch.manual_seed(2)
    mask = select_patches(None, 16, 64, ratio=0.95, share=1.0, min_visible=10)
    assert (mask.masked.sum(1) == 54).all() and (~mask.masked).sum(1).min() == 10
    assert len({tuple(r.tolist()) for r in mask.masked}) == 16
    with pytest.raises(UserError, match="min_visible"):
        mask_counts(64, 0.5, 1.0, 0)
    with pytest.raises(UserError, match="mask_ratio"):
        mask_counts(64, 1.0, 1.0, 1)


def test_the_softmax_axis_decides_which_patches_attention_ranks_first():
    """Word A matches patch 0 (logit 10) and nearly as well patch 1 (9); word B matches only patch 2, weakly (2).
    Over patches, every word spends one unit of attention, so B's lone weak match outranks A's runner-up; over
    words, a patch ranks by its own best match, so patch 1 comes second. [CLS], [SEP] and padding, planted to
    match patch 3, count in neither."""
    d = 4
    words = torch.zeros(1, 5, d)
    words[0, 1, 0] = words[0, 2, 1] = 1.0   # A, B between [CLS] and [SEP]
    words[0, [0, 3, 4], 2] = 1.0            # [CLS], [SEP], padding: all point at patch 3
    patches = torch.zeros(1, 4, d)
    patches[0, 0, 0], patches[0, 1, 0], patches[0, 2, 1], patches[0, 3, 2] = 10.0, 9.0, 2.0, 50.0
    patches *= d ** 0.5  # the scores' scale is 1 / sqrt(d)
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    over_patches = attention_scores(words, patches, attention, "patches")[0]
    over_words = attention_scores(words, patches, attention, "words")[0]
    assert over_patches.argsort(descending=True)[:3].tolist() == [0, 2, 1]
    assert over_words.argsort(descending=True)[:3].tolist() == [0, 1, 2]
    assert float(over_patches.sum()) == pytest.approx(1.0, abs=1e-5)  # a distribution over the patches
    a, b = torch.tensor([10.0, 9.0, 0.0, 0.0]).softmax(0), torch.tensor([0.0, 0.0, 2.0, 0.0]).softmax(0)
    assert torch.allclose(over_patches, (a + b) / 2, atol=1e-5)
    expected = [float((torch.tensor(pair).softmax(0) * torch.tensor(pair)).sum())
                for pair in ([10.0, 0.0], [9.0, 0.0], [0.0, 2.0], [0.0, 0.0])]
    assert torch.allclose(over_words, torch.tensor(expected), atol=1e-4)
    with pytest.raises(UserError, match="attention_softmax"):
        attention_scores(words, patches, attention, "tokens")


def _pieces(tokenizer, text):
    enc = tokenizer.hf([text], truncation=True, max_length=64, return_offsets_mapping=True,
                       return_special_tokens_mask=True, return_tensors="np")
    return enc["offset_mapping"][0], enc["special_tokens_mask"][0]


def test_entmlm_hides_every_entity_piece_and_no_stop_word(tokenizer):
    masker = TextMasker(tokenizer, "entity", entity_mask_prob=1.0, random_ratio=0.15)
    offsets, special = _pieces(tokenizer, REPORT)
    hidden = set(masker.choose(REPORT, offsets, special, np.random.default_rng(0)).tolist())
    entities = tag_entities(REPORT)
    assert entities
    in_entity = {i for i in range(len(offsets)) if not special[i] and offsets[i, 1] > offsets[i, 0]
                 and any(offsets[i, 0] < e.end and offsets[i, 1] > e.start for e in entities)}
    assert hidden == in_entity
    hidden_words = set()
    for i in hidden:
        start, end = next(span for span in word_spans(REPORT) if span[0] <= offsets[i, 0] < span[1])
        hidden_words.add(REPORT[start:end].strip(".,;:").lower())
    assert {"right", "effusion", "atelectasis", "pneumothorax"} <= hidden_words
    assert not hidden_words & STOP_WORDS


def test_entmlm_batch_masks_reports_and_leaves_prompts_alone(tokenizer):
    masker = TextMasker(tokenizer, "entity", entity_mask_prob=1.0, random_ratio=0.15)
    prompt = label_prompt({"Edema": 1.0}, TEMPLATES)
    plain, masked, labels = masker([REPORT, prompt], [np.random.default_rng(0)] * 2, [True, False])
    assert (labels[1] == IGNORE).all() and torch.equal(masked.input_ids[1], plain.input_ids[1])
    hidden = labels[0] != IGNORE
    assert hidden.any()
    assert (masked.input_ids[0][hidden] == tokenizer.hf.mask_token_id).all()
    assert torch.equal(labels[0][hidden], plain.input_ids[0][hidden])
    assert torch.equal(masked.input_ids[0][~hidden], plain.input_ids[0][~hidden])


def test_random_matched_hides_as_many_pieces_as_entity_masking(tokenizer):
    offsets, special = _pieces(tokenizer, REPORT)
    moved = 0
    for seed in range(8):
        entity = TextMasker(tokenizer, "entity", 0.5, 0.15).choose(REPORT, offsets, special,
                                                                 np.random.default_rng(seed))
        matched = TextMasker(tokenizer, "random-matched", 0.5, 0.15).choose(REPORT, offsets, special,
                                                                          np.random.default_rng(seed))
        longest_word = max(len(t) for t in tokenizer.hf([w for w in REPORT.split()], add_special_tokens=False)["input_ids"])
        assert len(entity) <= len(matched) < len(entity) + longest_word  # whole words: may overshoot by one word
        moved += not np.array_equal(entity, matched)
    assert moved >= 4  # same amount, other places


def test_report_without_entities_falls_back_to_random_words(tokenizer):
    text = "Comparison is made with the study of yesterday."
    assert not tag_entities(text)
    offsets, special = _pieces(tokenizer, text)
    hidden = TextMasker(tokenizer, "entity", 1.0, 0.15).choose(text, offsets, special, np.random.default_rng(0))
    assert len(hidden) >= 1


def test_prompts_from_positive_negative_and_uncertain_labels():
    values = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Edema": -1.0, "Consolidation": math.nan,
              "Pleural Effusion": 1.0}
    assert label_prompt(values, TEMPLATES) == ("There is atelectasis. There is pleural effusion. "
                                               "There may be edema. No cardiomegaly.")
    assert label_prompt(values, TEMPLATES, negatives=False) == ("There is atelectasis. There is pleural effusion."
                                                                " There may be edema.")
    assert label_prompt({"Edema": 0.0, "Atelectasis": math.nan}, TEMPLATES) == \
        "No acute cardiopulmonary abnormality. No edema."
    assert label_prompt({"Pleural_Thickening": 1.0, "No Finding": 0.0}, TEMPLATES) == "There is pleural thickening."
    assert label_prompt({"Edema": 1.0}, TEMPLATES, names={"Edema": "pulmonary edema"}) == "There is pulmonary edema."
    with pytest.raises(UserError, match="Edema"):
        label_prompt({"Edema": 2.0}, TEMPLATES)


def _hidden_words(text, offsets, hidden) -> set[str]:
    spans = word_spans(text)
    return {text[s:e].strip(".,;:").lower() for s, e in spans if any(s <= offsets[i, 0] < e for i in hidden)}


@pytest.mark.parametrize("mask_negated", [True, False])
def test_negated_entities_are_masked_only_when_the_switch_says(tokenizer, mask_negated):
    text = "Small right pleural effusion. No pneumothorax."
    assert [e.text for e in tag_entities(text) if e.negated] == ["pneumothorax"]
    masker = TextMasker.from_config(tokenizer, {"strategy": "entity", "entity_mask_prob": 1.0, "random_ratio": 0.15,
                                                "mask_negated": mask_negated})
    offsets, special = _pieces(tokenizer, text)
    hidden = _hidden_words(text, offsets, masker.choose(text, offsets, special, np.random.default_rng(0)))
    assert hidden == {"small", "right", "pleural", "effusion"} | ({"pneumothorax"} if mask_negated else set())
    # a report of negated findings only: no entity to hide, so the random fallback (one word at least)
    only = "No pneumothorax or pleural effusion."
    offsets, special = _pieces(tokenizer, only)
    hidden = [_hidden_words(only, offsets, TextMasker(tokenizer, "entity", 1.0, 0.0, mask_negated).choose(
        only, offsets, special, np.random.default_rng(seed))) for seed in range(6)]
    if mask_negated:
        assert all(h == {"pneumothorax", "pleural", "effusion"} for h in hidden)
    else:
        assert all(len(h) >= 1 for h in hidden) and len({frozenset(h) for h in hidden}) > 1  # random words
