"""Offline medical entity tagger for chest X-ray reports (the entity source of MMCLIP's EntMLM masking).

`tag_entities` finds findings, anatomy, laterality and modifier phrases in a report by dictionary lookup and
marks each as negated or uncertain with a NegEx-style trigger window. It needs no model and no network.

Vocabulary (retyped facts, no files copied):
* Findings: the CheXpert labeler's mention phrases per observation and its "other finding" (No Finding
  blocker) list, with its unmention phrases and its generated positional unmentions for Cardiomegaly and
  Enlarged Cardiomediastinum (stanfordmlgroup/chexpert-labeler `phrases/`, `stages/extract.py`; Irvin et al.
  2019, CheXpert; MIT licence), plus the observation words of MedKLIP that name findings (Wu et al. 2023,
  MedKLIP; the repository has no licence, so only the word list is used, as facts).
* Anatomy: words for MedKLIP's 51 anatomy ids (trachea, hilar, pleural, ..., lung_volumes) and a few more.
* Laterality and modifiers (severity, size, extent, distribution, time): local lists.

Matching follows the labeler where it can: phrases are case-insensitive and a labeler phrase matches as a
prefix, extended to the end of the word it starts in ("atelecta" tags "atelectatic"); an underscore marks a
word end ("drain_" does not tag "drainage"). Unlike the labeler, a match must start at a word start, so the
handful of compounds its substring search catches ("hydropneumothorax", "cardiomediastinal silhouette") are
listed explicitly. A word is a run of letters and digits with inner hyphens or apostrophes ("plate-like",
"covid-19"; a line break right after the hyphen is allowed); the words of a phrase may be separated by
whitespace holding at most one line break (MIMIC reports wrap at 79 columns). When phrases overlap, the
longest span wins; on the same span a labeler phrase beats another finding, which beats anatomy, laterality
and modifier. An `observation` is set only from labeler phrases (or local compounds that contain one, such
as "endotracheal tube"); MedKLIP and local findings carry None. Where a labeler unmention applies
("pericardial effusion", "calcified nodule", "massive", "over the heart") the mention is dropped and the
other lists tag the words ("pericardial" anatomy + "effusion" finding with observation None). Generic
labeler phrases are narrowed where they would tag nonsense; see the comments at "heart_", "contour" and
"support".

Negation and uncertainty: the labeler decides them with Semgrex rules over dependency parses (NegBio), which
need a parser and cannot ship as keywords. This module uses trigger phrases instead: a pre-trigger ("no",
"possible") covers the words after it up to the end of the sentence (. ; : ? ! or a blank line; a single
line break is wrapping, not an end), a terminator word (but, however, although, though, whereas, except,
aside, apart, which), the next trigger, or 12 words; a post-trigger ("is ruled out", "cannot be excluded")
covers the words before it back to the sentence start, a terminator (not "which": a which-clause speaks of
what precedes it, "..., which may be artifactual"), the previous trigger, or 12 words. Every entity in a scope gets the
flag, anatomy and modifiers included ("no focal consolidation" negates "focal" too). An entity in both kinds
of scope is uncertain, as the labeler aggregates negated+uncertain to uncertain. Following the labeler's
pattern files, "cannot exclude", "not excluded", "cannot rule out" and "no new" are uncertainty triggers,
while "no definite" and "no obvious" negate (they are in its negation.txt, not pre_negation_uncertainty.txt).

Known limits: no syntax, so scope errs where a parser would not ("No pneumothorax, small effusion." negates
the effusion; commas never end a scope; "X or Y" is not made uncertain as the labeler does); the labeler's
rule that a stable cardiac silhouette is uncertain is not reproduced; "left" the verb is tagged as laterality;
measurements ("5 cm") are not tagged; its text cleaning ("and/or" -> "or") is skipped so offsets stay exact.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

ENTITY_TYPES = ("finding", "anatomy", "laterality", "modifier")


@dataclass(frozen=True)
class Entity:
    start: int  # character offset into the original report text
    end: int  # exclusive; text[start:end] == entity.text
    type: str  # one of ENTITY_TYPES
    text: str
    negated: bool = False
    uncertain: bool = False
    observation: str | None = None  # the CheXpert observation a finding phrase belongs to, else None


STOP_WORDS = frozenset("""
a an the this that these those there here it its itself they them their theirs he him his she her hers we us
our ours you your yours i me my mine who whom whose which what when where why how
is are was were be been being am have has had having do does did doing
can could may might must shall should will would
and or nor but if then else than so as because while until though although
of at by for with without within about against between into through during before after above below to
from up down in out on off over under again further once
all any each few more most other some such no not only own same too very just also now
""".split())

_TERMINATORS = frozenset({"but", "however", "although", "though", "whereas", "except", "exception", "aside",
                          "apart", "which"})

# ---- CheXpert labeler phrases (labeler notation: prefix match, "_" = word edge) -------------------------------
_CHEXPERT_MENTIONS = {
    "Atelectasis": ("atelecta", "collapse"),
    "Cardiomegaly": (
        "cardiomegaly",
        # The labeler's "the heart" makes every mention of the heart a Cardiomegaly mention whose negation
        # decides the label ("the heart is normal in size" -> 0, "the heart is enlarged" -> 1). We keep that
        # meaning but tag only "heart" (no stop word) and as a whole word (not "heartburn"); where the labeler's
        # positional unmentions apply ("over the heart") it falls back to anatomy.
        "heart_",
        "heart size", "cardiac enlargement", "cardiac size", "cardiac shadow", "cardiac contour",
        "cardiac silhouette", "enlarged heart"),
    "Consolidation": ("consolidat",),
    "Edema": ("edema", "heart failure", "chf", "vascular congestion", "pulmonary congestion", "indistinctness",
              "vascular prominence"),
    "Enlarged Cardiomediastinum": (
        "_mediastinum", "cardiomediastinum",
        # The labeler's bare "contour" would make any contour (diaphragmatic, "contour of the heart") a
        # mediastinal mention; we keep the compounds radiologists mean by it.
        "mediastinal contour", "cardiomediastinal contour", "hilar contour",
        "mediastinal configuration", "mediastinal silhouette", "pericardial silhouette",
        # The labeler's substring search finds "mediastinal silhouette" inside this one.
        "cardiomediastinal silhouette",
        # "cardiac silhouette and vascularity" is dropped: an entity may not contain "and".
    ),
    "Fracture": ("fracture",),
    "Lung Lesion": ("mass", "nodular density", "nodular densities", "nodular opacity", "nodular opacities",
                    "nodular opacification", "nodule", "lump", "cavitary lesion", "carcinoma", "neoplasm",
                    "tumor"),
    "Lung Opacity": ("opaci", "decreased translucency", "increased density", "airspace disease",
                     "air-space disease", "air space disease", "infiltrate", "infiltration",
                     "interstitial marking", "interstitial pattern", "interstitial lung", "reticular pattern",
                     "reticular marking", "reticulation", "parenchymal scarring", "peribronchial thickening",
                     "wall thickening", "scar"),
    "Pleural Effusion": ("pleural fluid", "effusion"),
    "Pleural Other": ("pleural thickening", "fibrosis", "fibrothorax", "pleural scar", "pleural parenchymal scar",
                      "pleuro-parenchymal scar", "pleuro-pericardial scar"),
    "Pneumonia": ("pneumonia", "infection", "infectious process", "infectious",
                  # substring matches of the labeler that a word-start match would miss
                  "bronchopneumonia"),
    "Pneumothorax": ("pneumothorax", "pneumothoraces", "hydropneumothorax"),
    "Support Devices": (
        "pacer", "_line_", "lines", "picc", "tube", "valve", "catheter", "pacemaker", "hardware", "arthroplast",
        "marker", "icd", "defib", "device", "drain_", "plate", "screw", "cannula", "apparatus", "coil",
        # The labeler's bare "support" would tag "findings support pneumonia"; keep its device sense only.
        "support device", "support line", "support tube", "support apparatus",
        "equipment", "mediport",
        # local compounds: the whole device is one entity (the labeler tags them through tube/catheter/line)
        "endotracheal tube", "nasogastric tube", "orogastric tube", "enteric tube", "feeding tube", "chest tube",
        "tracheostomy tube", "central venous catheter", "central line", "picc line", "swan-ganz catheter"),
}
# The labeler's No Finding list: other findings, tagged with observation None. "fissure" is anatomy here.
_CHEXPERT_OTHER = (
    "emphysema", "blunt", "density", "elevation", "eventration", "scoliosis", "degenera", "calcifi",
    "hyperinflation", "bronchospasm", "asthma", "hernia", "copd", "interstitial markings", "plaque",
    "osteophytosis", "aortic disease", "bronchiolitis", "airways disease", "thickening", "cephalization",
    "aspiration", "bullae", "hyperinflat", "contusion", "atherosclero", "osteopenia", "metastasis", "granuloma",
    "pneumomediastinum", "pneumoperitoneum", "osteodystrophy", "cuffing", "irregular lucency", "inflam",
    "hypertension", "prominen", "kyphosis", "defib", "hyperexpansion", "bullet", "reticula", "thoracentesis",
    "bronchitis", "volume loss", "deformity", "hemorrhage", "hematoma", "radiopaque", "aerophagia", "arthropathy",
    "tracheostomy")
# Unmentions: a mention of the observation overlapping one of these spans is dropped; other lexicon entries
# (a MedKLIP word, anatomy, a modifier) may still tag the words.
_CHEXPERT_UNMENTIONS = {
    "Lung Lesion": ("calcified nodul", "massive", "massengale"),
    "Lung Opacity": ("pleural scar",),
    "Pleural Effusion": ("pericardial effusion",),
    # local: "plate-like atelectasis" is no plate, and "tube" must not tag "tuberculosis"
    "Support Devices": ("plate-like", "platelike", "plate like", "tubercul"),
}


def _positional_unmentions() -> dict[str, list[str]]:
    """The labeler's "over the / in the [superior|left|right] <mention>" unmentions (a line projecting over
    the heart is not cardiomegaly). It writes "_mediastinum" there with a doubled space that never matches;
    we use the intended single space."""
    places = [f"{a} {b}".strip() for a, b in product(("over the", "overly the", "in the"),
                                                      ("", "superior", "left", "right"))]
    cardio = [m for m in _CHEXPERT_MENTIONS["Cardiomegaly"] if m not in ("cardiomegaly", "cardiac enlargement")]
    return {obs: [f"{p} {m.strip('_')}{'_' if m.endswith('_') else ''}" for p in places for m in mentions]
            for obs, mentions in (("Cardiomegaly", cardio),
                                  ("Enlarged Cardiomediastinum", _CHEXPERT_MENTIONS["Enlarged Cardiomediastinum"]))}


# ---- whole-word lists (every inflection spelled out) --------------------------------------------------------
# MedKLIP observations that name findings (its normality words, tail_abnorm_obs and excluded_obs skipped;
# verbs given in their finding forms). They duplicate some labeler phrases on purpose: a span whose labeler
# mention is unmentioned ("pericardial effusion") falls back to them.
_MEDKLIP_FINDINGS = (
    "effusion effusions opacity opacities pneumothorax edema atelectasis tube tubes consolidation process "
    "abnormality abnormalities enlargement pneumonia line lines congestion catheter catheters cardiomegaly "
    "fracture fractures tortuous tortuosity lead leads disease calcification calcifications prominence device "
    "devices engorgement picc clip clips elevation nodule nodules wire wires fluid degenerative pacemaker "
    "thickening marking markings scar scars scarring hyperinflation blunting widening collapse density "
    "densities emphysema mass masses crowding infiltrate infiltrates deformity hernia distention distension "
    "shift stent stents lesion lesions hardware dilation dilatation chf redistribution aspiration").split()
_LOCAL_FINDINGS = ("tuberculosis", "air-fluid level", "hiatal hernia", "covid-19", "lymphadenopathy",
                   "bronchiectasis")
_ANATOMY = (
    "trachea", "tracheal", "carina", "hilum", "hila", "hilar", "perihilar", "pleura", "pleural", "heart",
    "heart border", "heart borders", "diaphragm", "diaphragms", "diaphragmatic", "hemidiaphragm",
    "hemidiaphragms", "retrocardiac", "lobe", "lobes", "lung", "lungs", "apex", "apices", "apical", "base",
    "bases", "basilar", "basal", "lung base", "lung bases", "lung apex", "lung apices", "costophrenic",
    "costophrenic angle", "costophrenic angles", "costophrenic sulcus", "costophrenic sulci", "cardiophrenic",
    "cardiophrenic angle", "cardiophrenic angles", "cardiophrenic sulcus", "mediastinum", "mediastinal", "spine",
    "vertebra", "vertebrae", "vertebral", "clavicle", "clavicles", "rib", "ribs", "stomach", "atrium", "atria",
    "atrial", "ventricle", "ventricles", "ventricular", "aorta", "aortic", "svc", "vena cava",
    "superior vena cava", "cavoatrial junction", "interstitium", "interstitial", "parenchyma", "parenchymal",
    "cardiopulmonary", "pulmonary", "lung volume", "lung volumes", "cardiac", "pericardial", "pericardium",
    "chest", "thorax", "thoracic", "intrathoracic", "hemithorax", "hemithoraces", "fissure", "fissures",
    "lingula", "lingular", "bronchus", "bronchi", "bronchial", "vascular", "vasculature", "abdomen", "sternum",
    "esophagus", "humerus", "scapula", "shoulder", "shoulders")
# "bibasilar" is laterality: what it adds to "basilar" is the side.
_LATERALITY = ("left", "right", "bilateral", "bilaterally", "both", "unilateral", "left-sided", "right-sided",
               "bibasilar", "bibasal")
_MODIFIERS = (
    "small", "smaller", "moderate", "moderately", "large", "larger", "mild", "mildly", "severe", "severely",
    "minimal", "minimally", "trace", "tiny", "massive", "marked", "markedly", "extensive", "slight", "slightly",
    "subtle", "small-to-moderate", "moderate-to-large", "mild-to-moderate", "moderate-to-severe",
    "moderate-sized", "small-sized", "large-sized", "loculated", "focal", "diffuse", "diffusely", "patchy",
    "multifocal", "lobar", "segmental", "subsegmental", "upper", "lower", "mid", "middle", "peripheral",
    "central", "scattered", "confluent", "streaky", "linear", "plate-like", "platelike", "discoid", "nodular",
    "ground-glass", "ground glass", "hazy", "dense", "faint", "ill-defined", "well-defined", "alveolar",
    "anterior", "posterior", "lateral", "medial", "superior", "inferior", "dependent", "layering", "multiple",
    "low", "new", "newly", "increased", "increasing", "decreased", "decreasing", "worsening", "worsened",
    "worse", "improving", "improved", "enlarged", "enlarging", "persistent", "persistently", "residual",
    "chronic", "acute", "subacute", "stable", "unchanged", "recurrent", "developing", "early", "old", "healed",
    "healing", "resolving", "interval", "flattened", "flattening", "elevated", "thickened", "widened", "dilated",
    "distended", "engorged", "hyperexpanded")

# ---- negation / uncertainty triggers: phrase -> (flag, direction, window in words) ---------------------------
_WINDOW = 12
_PRE_NEG = ("no", "not", "without", "negative for", "free of", "clear of", "absence of", "no evidence of",
            "no evidence for", "without evidence of", "no signs of", "no sign of", "no definite", "no obvious",
            "no focal", "no acute", "no significant", "resolution of", "rule out", "rather than")
_POST_NEG = ("ruled out", "not seen", "not identified", "not visualized", "not present", "not evident",
             "not demonstrated", "not enlarged", "not widened", "absent", "cleared", "removed", "no longer seen",
             "no longer visualized", "no longer present", "no longer evident", "within normal limits",
             *(f"{verb} {state}" for verb in ("is", "are", "appears", "appear", "remains", "remain")
               for state in ("normal", "unremarkable")))
_PRE_UNC = ("possible", "possibly", "may", "might", "could", "likely", "probable", "probably", "questionable",
            "question of", "suspected", "suspicious for", "suspicion for", "suspicion of", "concerning for",
            "concern for", "worrisome for", "suggest", "suggests", "suggesting", "suggestive of", "suggestion of",
            "borderline", "equivocal", "presumed", "presumably", "cannot exclude", "can not exclude",
            "can't exclude", "cannot rule out", "can not rule out", "no evidence to rule out", "no new",
            "differential", "evaluate for", "evaluation for", "assess for")
_POST_UNC = ("not excluded", "not be excluded", "cannot be excluded", "not ruled out", "not be ruled out",
             "cannot be ruled out", "less likely", "is borderline", "may be present", "might be present",
             "could be present", "may be artifactual", "may be artifact", "could be artifactual",
             "possibly artifactual", "not well visualized", "not well seen", "not clearly seen", "poorly evaluated",
             "incompletely evaluated")
# A copula phrase may point either way: "the opacity is likely atelectasis".
_BOTH_UNC = ("unlikely", *(f"{verb} {state}" for verb in ("is", "are")
                           for state in ("possible", "likely", "suspected", "questionable", "unlikely")))
_TRIGGERS = {
    **{p: ("neg", "pre", _WINDOW) for p in _PRE_NEG},
    **{p: ("neg", "post", _WINDOW) for p in _POST_NEG},
    "resolved": ("neg", "both", _WINDOW),
    # bare normality words reach only their own noun phrase: "normal heart size", not a later finding
    "normal": ("neg", "pre", 4),
    "unremarkable": ("neg", "pre", 4),
    **{p: ("unc", "pre", _WINDOW) for p in _PRE_UNC},
    **{p: ("unc", "post", _WINDOW) for p in _POST_UNC},
    **{p: ("unc", "both", _WINDOW) for p in _BOTH_UNC},
    # "atelectasis versus pneumonia": both alternatives, and no further
    "versus": ("unc", "both", 4),
    "vs": ("unc", "both", 4),
}

_RANK = {"chexpert": 0, "finding": 1, "anatomy": 2, "laterality": 3, "modifier": 4}


@dataclass(frozen=True)
class _Entry:
    words: tuple[str, ...]
    prefix: bool  # the last word matches as a prefix of a text word
    label: str  # entity type, "veto" or "trigger"
    observation: str | None = None
    rank: int = 0
    trigger: tuple[str, str, int] | None = None  # (flag, direction, window)


def _words(phrase: str) -> tuple[str, ...]:
    return tuple(phrase.replace("_", " ").split())


def _labeler(phrase: str, label: str, observation: str | None, rank: int) -> _Entry:
    return _Entry(_words(phrase), not phrase.endswith("_"), label, observation, rank)


def _whole(phrase: str, label: str, rank: int) -> _Entry:
    return _Entry(_words(phrase), False, label, None, rank)


class _Node:
    """A word trie node: phrases ending at this word, children by next word, and phrases whose last word
    matches as a prefix of the next text word, keyed by that prefix."""

    def __init__(self):
        self.ends: list[_Entry] = []
        self.next: dict[str, _Node] = {}
        self.prefixed: dict[str, list[_Entry]] = defaultdict(list)
        self.prefix_lengths: list[int] = []

    def by_prefix(self, w: str) -> list[_Entry]:
        out = []
        for n in self.prefix_lengths:
            if n > len(w):
                break
            out.extend(self.prefixed.get(w[:n], ()))
        return out


class _Lexicon:
    def __init__(self, entries: list[_Entry]):
        self.entries = entries
        self.root = _Node()
        for e in entries:
            node = self.root
            for w in e.words[:-1]:
                node = node.next.setdefault(w, _Node())
            if e.prefix:
                node.prefixed[e.words[-1]].append(e)
            else:
                node.next.setdefault(e.words[-1], _Node()).ends.append(e)
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.prefix_lengths = sorted({len(k) for k in node.prefixed})
            stack.extend(node.next.values())
        # the first step is the same for every occurrence of a word, and report vocabulary repeats a lot
        self.first = lru_cache(maxsize=1 << 16)(self._first)

    def _first(self, w: str) -> tuple[tuple[_Entry, ...], _Node | None]:
        return tuple(self.root.by_prefix(w)), self.root.next.get(w)

    def matches(self, words: list[str], joinable: list[bool], i: int) -> list[tuple[_Entry, int]]:
        """Entries matching at word i, each with the index after its last word."""
        prefixed, node = self.first(words[i])
        out = [(e, i + 1) for e in prefixed]
        k = i
        while node is not None:
            out.extend((e, k + 1) for e in node.ends)
            k += 1
            if k == len(words) or not joinable[k - 1]:
                break
            out.extend((e, k + 1) for e in node.by_prefix(words[k]))
            node = node.next.get(words[k])
        return out


def _build() -> _Lexicon:
    entries = [_labeler(p, "finding", obs, _RANK["chexpert"])
               for obs, phrases in _CHEXPERT_MENTIONS.items() for p in phrases]
    entries += [_labeler(p, "finding", None, _RANK["finding"]) for p in _CHEXPERT_OTHER]
    entries += [_whole(p, "finding", _RANK["finding"]) for p in (*_MEDKLIP_FINDINGS, *_LOCAL_FINDINGS)]
    for label, phrases in (("anatomy", _ANATOMY), ("laterality", _LATERALITY), ("modifier", _MODIFIERS)):
        entries += [_whole(p, label, _RANK[label]) for p in phrases]
    unmentions = {obs: list(phrases) for obs, phrases in _CHEXPERT_UNMENTIONS.items()}
    for obs, phrases in _positional_unmentions().items():
        unmentions.setdefault(obs, []).extend(phrases)
    entries += [_labeler(p, "veto", obs, 0) for obs, phrases in unmentions.items() for p in phrases]
    entries += [_Entry(_words(p), False, "trigger", trigger=t) for p, t in _TRIGGERS.items()]
    return _Lexicon(entries)


_LEXICON = _build()
# a hyphen at a line end joins the word halves, as in "plate-\n like" from wrapping that breaks on hyphens
_TOKEN = re.compile(r"[^\W_]+(?:(?:['’]|-(?:[ \t]*\n[ \t]*)?)[^\W_]+)*")
# sentence ends; a period after an abbreviation ("vs.", "e.g.") or inside a number ("1.5") is none
_BREAK = re.compile(r"(?<!\bvs)(?<!\be\.g)(?<!\bi\.e)\.(?!\d)|[;?!]|:(?!\d)|\n[ \t]*\n", re.IGNORECASE)


def _joinable(gap: str) -> bool:
    return gap.isspace() and gap.count("\n") <= 1


def tag_entities(text: str) -> list[Entity]:
    """Sorted by start, non-overlapping; longest match wins."""
    spans = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    if not spans:
        return []
    words = [text[s:e].lower() for s, e in spans]
    words = [w if "\n" not in w else "".join(w.split()) for w in words]
    joinable = [_joinable(text[spans[k][1]:spans[k + 1][0]]) for k in range(len(spans) - 1)]

    vetoed: dict[str, list[tuple[int, int]]] = defaultdict(list)
    candidates, triggers = [], {}
    for i, w in enumerate(words):
        if _LEXICON.first(w) == ((), None):
            continue
        for e, j in _LEXICON.matches(words, joinable, i):
            if e.label == "veto":
                vetoed[e.observation].append((i, j))
            elif e.label == "trigger":
                if j > triggers.get(i, (0,))[0]:
                    triggers[i] = (j, e.trigger)
            else:
                candidates.append((i, j, e))
    if vetoed:
        candidates = [(i, j, e) for i, j, e in candidates
                      if not any(i < vj and vi < j for vi, vj in vetoed.get(e.observation, ()))]
    candidates.sort(key=lambda c: (spans[c[0]][0] - spans[c[1] - 1][1], c[0], c[2].rank))
    taken = [False] * len(words)
    chosen = []
    for i, j, e in candidates:
        if not any(taken[i:j]):
            taken[i:j] = [True] * (j - i)
            chosen.append((i, j, e))
    chosen.sort(key=lambda c: c[0])

    negated, uncertain = _scopes(text, spans, words, triggers) if triggers else ([False] * len(words),) * 2
    out = []
    for i, j, e in chosen:
        unc = any(uncertain[i:j])
        start, end = spans[i][0], spans[j - 1][1]
        out.append(Entity(start, end, e.label, text[start:end], negated=any(negated[i:j]) and not unc,
                          uncertain=unc, observation=e.observation))
    return out


def _scopes(text: str, spans: list[tuple[int, int]], words: list[str],
            found: dict[int, tuple[int, tuple[str, str, int]]]) -> tuple[list[bool], list[bool]]:
    """Per word: inside a negation scope, inside an uncertainty scope. `found` holds the longest trigger
    starting at each word; read left to right, a trigger inside an earlier one is skipped."""
    breaks = [m.start() for m in _BREAK.finditer(text)]
    sentence = [bisect_right(breaks, s) for s, _ in spans]
    n = len(words)
    triggers, in_trigger, end = [], [False] * n, 0
    for i in sorted(found):
        if i >= end:
            end, trigger = found[i]
            triggers.append((i, end, trigger))
            in_trigger[i:end] = [True] * (end - i)
    flags = {"neg": [False] * n, "unc": [False] * n}
    for i, j, (flag, direction, window) in triggers:
        lo, hi = i, j
        if direction in ("pre", "both"):
            while (hi < n and hi - j < window and sentence[hi] == sentence[i] and not in_trigger[hi]
                   and words[hi] not in _TERMINATORS):
                hi += 1
        if direction in ("post", "both"):
            while (lo > 0 and i - lo < window and sentence[lo - 1] == sentence[i] and not in_trigger[lo - 1]
                   and (words[lo - 1] == "which" or words[lo - 1] not in _TERMINATORS)):
                lo -= 1
        flags[flag][lo:hi] = [True] * (hi - lo)
    return flags["neg"], flags["unc"]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each whitespace-separated word, in order."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def entity_word_spans(text: str, entities: list[Entity]) -> list[tuple[int, int, str]]:
    """Each entity as (first word index, last word index + 1, type) over word_spans(text)."""
    spans = word_spans(text)
    starts = [s for s, _ in spans]
    out = []
    for e in entities:
        first = bisect_right(starts, e.start) - 1
        last = bisect_right(starts, e.end - 1) - 1
        if first < 0 or e.start >= spans[first][1] or e.end > spans[last][1]:
            raise ValueError(f"entity {e.text!r} at {e.start}:{e.end} does not lie on words of this text")
        out.append((first, last + 1, e.type))
    return out
