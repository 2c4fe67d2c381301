"""The offline report entity tagger: spans, lexicon semantics, negation/uncertainty, and agreement with the
synthetic report generator's own CheXpert labels."""
from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from bench.data.synth.findings import CHEXPERT_LABELS, sample_patient
from bench.data.synth.reports import mimic_report_file, write_report
from bench.modeling.entities import (_LEXICON, ENTITY_TYPES, STOP_WORDS, Entity, entity_word_spans, tag_entities,
                                     word_spans)

KNOWN = "Loculated right pleural effusion with basilar atelectasis. No pneumothorax. Heart size is mildly enlarged."
HANDWRITTEN = [
    KNOWN,
    "No pleural effusion or pneumothorax.",
    "No effusion, but there is a right lower lobe consolidation.",
    "Atelectatic changes at the left base. Consolidative opacity in the right upper lobe.",
    "Small pericardial effusion. Calcified nodules in the right apex. Massive left effusion.",
    "Pacemaker leads project over the heart. The heart is mildly enlarged, which may be artifactual.",
    "The cardiomediastinal silhouette is normal.\nThe mediastinal and hilar contours are unremarkable.",
    "Atelectasis vs. pneumonia in the left lower lobe; no new focal consolidation (1.5 cm), PICC line tip in the SVC.",
    "Findings support the diagnosis of pneumonia. Plate-like atelectasis. History of tuberculosis.",
]


def _reports(n: int = 300) -> list[tuple[object, str, int]]:
    """(patient, whole MIMIC-style report file, offset of the FINDINGS section) for n seeded patients."""
    out = []
    for seed in range(n):
        rng = np.random.default_rng([2024, seed])
        patient = sample_patient(rng)
        findings, impression = write_report(patient, rng)
        text = mimic_report_file(findings, impression, rng, "PA")
        out.append((patient, text, text.index("FINDINGS:")))
    return out


@pytest.fixture(scope="module")
def reports():
    return _reports()


def _tags(text: str) -> list[tuple[str, str]]:
    return [(e.text, e.type) for e in tag_entities(text)]


def test_known_report_exact_entities():
    entities = tag_entities(KNOWN)
    assert [(e.text, e.type) for e in entities] == [
        ("Loculated", "modifier"), ("right", "laterality"), ("pleural", "anatomy"), ("effusion", "finding"),
        ("basilar", "anatomy"), ("atelectasis", "finding"), ("pneumothorax", "finding"),
        ("Heart size", "finding"), ("mildly", "modifier"), ("enlarged", "modifier")]
    assert [e.observation for e in entities if e.type == "finding"] == [
        "Pleural Effusion", "Atelectasis", "Pneumothorax", "Cardiomegaly"]
    assert [e.text for e in entities if e.negated] == ["pneumothorax"]
    assert not any(e.uncertain for e in entities)
    assert all(KNOWN[e.start:e.end] == e.text for e in entities)


def test_span_invariants_on_handwritten_and_generated_reports(reports):
    texts = [*HANDWRITTEN, *(text for _, text, _ in reports)]
    seen_types = set()
    for text in texts:
        entities = tag_entities(text)
        words = word_spans(text)
        assert words == [(m, m + len(w)) for m, w in _whitespace_words(text)]
        for e in entities:
            assert text[e.start:e.end] == e.text
            assert e.type in ENTITY_TYPES
            assert not {w.lower() for w in e.text.split()} & STOP_WORDS, e
            assert e.observation is None or (e.type == "finding" and e.observation in CHEXPERT_LABELS)
            assert not (e.negated and e.uncertain)
            seen_types.add(e.type)
        assert all(a.end <= b.start for a, b in pairwise(entities)), "sorted and non-overlapping"
        for e, (first, stop, type_) in zip(entities, entity_word_spans(text, entities), strict=True):
            assert type_ == e.type
            assert words[first][0] <= e.start < words[first][1]
            assert words[stop - 1][0] < e.end <= words[stop - 1][1]
            assert stop - first == len(e.text.split())
    assert seen_types == set(ENTITY_TYPES)


def _whitespace_words(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for w in text.split():
        pos = text.index(w, pos)
        out.append((pos, w))
        pos += len(w)
    return out


def test_entity_word_spans_refuses_entities_of_another_text():
    with pytest.raises(ValueError, match="does not lie on words"):
        entity_word_spans("no  effusion", [Entity(2, 3, "finding", " ")])


def test_no_lexicon_phrase_holds_a_stop_word():
    phrases = [e.words for e in _LEXICON.entries if e.label in ENTITY_TYPES]
    assert len(phrases) > 300
    assert not [p for p in phrases if set(p) & STOP_WORDS]
    assert {"both", "left", "right"}.isdisjoint(STOP_WORDS) and {"the", "no", "not", "with"} <= STOP_WORDS


def test_offsets_survive_case_and_unicode_that_changes_length_when_lowered():
    text = "İİ NO PLEURAL\n EFFUSION. Heart size is normal."
    entities = tag_entities(text)
    assert [(e.text, e.negated) for e in entities] == [
        ("PLEURAL", True), ("EFFUSION", True), ("Heart size", True)]
    assert all(text[e.start:e.end] == e.text for e in entities)


def test_longest_match_and_multiword_entries():
    assert _tags("Blunting of the left costophrenic angle. Low lung volumes. Right pleural thickening.") == [
        ("Blunting", "finding"), ("left", "laterality"), ("costophrenic angle", "anatomy"), ("Low", "modifier"),
        ("lung volumes", "anatomy"), ("Right", "laterality"), ("pleural thickening", "finding")]
    # a phrase never joins words across a sentence end or a blank line
    assert _tags("pleural. fluid") == [("pleural", "anatomy"), ("fluid", "finding")]
    assert _tags("pleural\n\nfluid") == [("pleural", "anatomy"), ("fluid", "finding")]
    assert _tags("pleural\n fluid") == [("pleural\n fluid", "finding")]
    # wrapping that breaks after a hyphen keeps the word whole (no "plate" device here)
    assert _tags("plate-\n like atelectasis") == [("plate-\n like", "modifier"), ("atelectasis", "finding")]


def test_negation_scope():
    entities = tag_entities("No pleural effusion or pneumothorax.")
    assert {e.text: e.negated for e in entities if e.type == "finding"} == {"effusion": True, "pneumothorax": True}
    entities = tag_entities("No effusion, but there is a right lower lobe consolidation.")
    assert {e.text: e.negated for e in entities if e.type == "finding"} == {"effusion": True, "consolidation": False}
    assert not any(e.negated for e in tag_entities("Pneumothorax. No.\nEdema"))
    entities = tag_entities("The heart is not enlarged. Pneumothorax has resolved. Effusion is ruled out.")
    assert [(e.text, e.negated) for e in entities if e.type == "finding"] == [
        ("heart", True), ("Pneumothorax", True), ("Effusion", True)]
    # a bare normality word reaches its own noun phrase only
    entities = tag_entities("Normal heart size with a small left effusion.")
    assert [(e.text, e.negated) for e in entities if e.type == "finding"] == [("heart size", True), ("effusion", False)]


@pytest.mark.parametrize("text, finding", [
    ("Possible early pneumonia.", "pneumonia"),
    ("Cannot exclude pneumonia.", "pneumonia"),
    ("Pneumonia cannot be excluded.", "Pneumonia"),
    ("Right basilar opacity may represent atelectasis.", "atelectasis"),
    ("No new consolidation.", "consolidation"),
    ("Pneumothorax is not excluded.", "Pneumothorax"),
    ("The mediastinum is widened, which may be artifactual.", "mediastinum"),
    ("Atelectasis versus pneumonia.", "Atelectasis"),
    ("Atelectasis versus pneumonia.", "pneumonia"),
])
def test_uncertainty(text, finding):
    [entity] = [e for e in tag_entities(text) if e.text == finding]
    assert entity.uncertain and not entity.negated


def test_uncertainty_scope_ends_at_sentence_and_terminator():
    entities = tag_entities("Possible small effusion; no pneumothorax. Atelectasis vs. pneumonia in the left lower "
                            "lobe, however the heart size is normal.")
    assert [(e.text, e.negated, e.uncertain) for e in entities if e.type == "finding"] == [
        ("effusion", False, True), ("pneumothorax", True, False), ("Atelectasis", False, True),
        ("pneumonia", False, True), ("heart size", True, False)]


def test_labeler_substring_semantics_and_unmentions():
    obs = {e.text.lower(): e.observation for e in tag_entities(
        "Atelectatic changes. Consolidative opacities. Infiltrates. Hydropneumothorax. Interstitial lung disease.")}
    assert obs == {"atelectatic": "Atelectasis", "consolidative": "Consolidation", "opacities": "Lung Opacity",
                   "infiltrates": "Lung Opacity", "hydropneumothorax": "Pneumothorax",
                   "interstitial lung": "Lung Opacity", "disease": None}
    # unmentions: the span loses the observation, and a later labeler mention is unaffected
    entities = tag_entities("Small pericardial effusion. Calcified nodule. Massive right effusion.")
    assert [(e.text, e.type, e.observation) for e in entities if e.type != "modifier" or e.text == "Massive"] == [
        ("pericardial", "anatomy", None), ("effusion", "finding", None), ("Calcified", "finding", None),
        ("nodule", "finding", None), ("Massive", "modifier", None), ("right", "laterality", None),
        ("effusion", "finding", "Pleural Effusion")]
    # generic labeler phrases kept sensible
    assert ("heart", "anatomy") in _tags("Leads project over the heart.")
    assert _tags("The heart is enlarged.") == [("heart", "finding"), ("enlarged", "modifier")]
    entities = tag_entities("Findings support pneumonia. Plate-like atelectasis. History of tuberculosis.")
    assert [(e.text, e.observation) for e in entities if e.type == "finding"] == [
        ("pneumonia", "Pneumonia"), ("atelectasis", "Atelectasis"), ("tuberculosis", None)]
    assert [e.observation for e in tag_entities("Right PICC line and endotracheal tube.") if e.type == "finding"] \
        == ["Support Devices", "Support Devices"]


_PRIORITY = {1.0: 2, -1.0: 1, 0.0: 0}


def _mention_labels(entities: list[Entity]) -> dict[str, float]:
    """The labeler's aggregation of mentions: positive beats uncertain beats negated."""
    out: dict[str, float] = {}
    for e in entities:
        if e.observation is not None:
            value = -1.0 if e.uncertain else 0.0 if e.negated else 1.0
            out[e.observation] = max(out.get(e.observation, 0.0), value, key=_PRIORITY.__getitem__)
    return out


def test_generated_reports_agree_with_the_generator_labels(reports):
    """Every observation the generator states (positive 1, negated 0, hedged -1, absent NaN) comes out of the
    tagged findings and impression with the same CheXpert label; its non-CheXpert findings are tagged too."""
    wrong = []
    for patient, text, offset in reports:
        entities = [e for e in tag_entities(text) if e.start >= offset]  # the indication may mention pneumonia
        got = _mention_labels(entities)
        expected = {k: v for k, v in patient.labels().items() if k != "No Finding" and not math.isnan(v)}
        if got != expected:
            wrong.append((text[offset:], expected, got))
        generic = {w.lower() for e in entities if e.type == "finding" and e.observation is None for w in e.text.split()}
        for name in ("Emphysema", "Hernia"):
            if name in patient.findings and name.lower() not in generic:
                wrong.append((text[offset:], name, generic))
    assert not wrong, wrong[:3]
    stated = [v for p, _, _ in reports for k, v in p.labels().items() if k != "No Finding"]
    assert {1.0, 0.0, -1.0} <= set(stated), "the sample must hold positive, negated and hedged findings"
