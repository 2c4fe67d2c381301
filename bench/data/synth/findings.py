"""What a synthetic patient has: findings with side, zone, severity and certainty, and their labels.

The label semantics follow the CheXpert labeler: 1.0 positive, 0.0 negated in the report, -1.0 uncertain,
blank (NaN) not mentioned; `Lung Opacity` is implied by any parenchymal opacity, `No Finding` is set when
nothing but support devices is positive or uncertain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]

# finding -> prevalence in the synthetic population
PREVALENCE = {
    "Cardiomegaly": 0.25, "Pleural Effusion": 0.25, "Consolidation": 0.2, "Pneumonia": 0.2,
    "Edema": 0.15, "Atelectasis": 0.20, "Pneumothorax": 0.3, "Lung Lesion": 0.12,
    "Enlarged Cardiomediastinum": 0.08, "Support Devices": 0.1, "Fracture": 0.05, "Pleural Other": 0.06,
    # findings outside the CheXpert labels that ChestX-ray14 names, and COVID-19's ground glass (COVIDx)
    "Emphysema": 0.08, "Fibrosis": 0.08, "Hernia": 0.05, "Infiltration": 0.1, "COVID-19": 0.1,
}
# findings outside the 14 CheXpert observations, and the observation the CheXpert labeler files them under
# (None: none of the 14, but still not "No Finding"); Lung Opacity is derived below
CHEXPERT_AS = {"Fibrosis": "Pleural Other", "Infiltration": None, "COVID-19": "Pneumonia", "Emphysema": None,
               "Hernia": None}  # COVID-19's report says "covid-19 pneumonia", which the labeler files as Pneumonia
NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NIH_FROM = {"Effusion": "Pleural Effusion", "Pleural_Thickening": "Pleural Other", "Mass": "Lung Lesion",
            "Nodule": "Lung Lesion"}
COVIDX_CLASSES = ["normal", "pneumonia", "COVID-19"]
# Lung Opacity as the labeler reads the report (its phrases: "opaci", "infiltrat", ...: only these findings'
# sentences use them) and as radiologists read the image (every parenchymal opacity)
OPACITY_MENTIONED = ("Pneumonia", "Infiltration", "Fibrosis", "COVID-19")
OPACITY_SEEN = (*OPACITY_MENTIONED, "Consolidation", "Edema", "Atelectasis", "Lung Lesion")
# absent findings a radiologist commonly states as negative
ROUTINELY_NEGATED = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Cardiomegaly")
UNCERTAIN_SHARE = 0.15
NEGATION_RATE = 0.6


@dataclass
class Finding:
    name: str
    side: str  # "right", "left" or "bilateral" (the patient's side; image left is patient right)
    zone: str  # "upper", "mid" or "lower"
    severity: int  # 1 mild/small, 2 moderate, 3 severe/large
    uncertain: bool = False
    device: str = ""  # support device kind


@dataclass
class Patient:
    findings: dict[str, Finding] = field(default_factory=dict)
    negated: list[str] = field(default_factory=list)
    age: int = 60
    sex: str = "Female"

    def labels(self, with_mentions: bool = True) -> dict[str, float]:
        """CheXpert-style labels. `with_mentions=False` gives the consensus 0/1 form (valid/test sets)."""
        out: dict[str, float] = {name: np.nan for name in CHEXPERT_LABELS}
        for name in self.negated:
            out[name] = 0.0
        other = False  # a finding outside the 14 observations still rules out "No Finding"
        for name, f in self.findings.items():
            value = -1.0 if f.uncertain else 1.0
            name = CHEXPERT_AS.get(name, name)
            if name is None:
                other = True
            elif not out[name] == 1.0:
                out[name] = value
        opacity = [-1.0 if f.uncertain else 1.0 for n, f in self.findings.items()
                   if n in (OPACITY_MENTIONED if with_mentions else OPACITY_SEEN)]
        if opacity:
            out["Lung Opacity"] = max(opacity)
        abnormal = [n for n, v in out.items() if n not in ("No Finding", "Support Devices") and v in (1.0, -1.0)]
        if not abnormal and not other:
            out["No Finding"] = 1.0
        if not with_mentions:
            # uncertain findings are drawn (faintly), so the consensus reading calls them present
            out = {n: 1.0 if v in (1.0, -1.0) else 0.0 for n, v in out.items()}
        return out


    def nih_labels(self) -> list[str]:
        """ChestX-ray14's names for what is drawn (its NLP labels keep hedged findings as positive)."""
        out = []
        for label in NIH_LABELS:
            f = self.findings.get(NIH_FROM.get(label, label))
            if label == "Pneumonia" and f is None:  # its NLP reads "covid-19 pneumonia" as Pneumonia
                f = self.findings.get("COVID-19")
            if f is not None and (label != "Mass" or f.severity == 3) and (label != "Nodule" or f.severity < 3):
                out.append(label)
        return out


def sample_covidx_patient(rng: np.random.Generator, cls: str) -> Patient:
    """A COVIDx case of class `cls`: normal, focal bacterial-looking pneumonia, or COVID-19's bilateral
    peripheral ground glass."""
    p = Patient(age=int(rng.integers(20, 91)), sex=str(rng.choice(["Female", "Male"])))
    if cls == "pneumonia":
        p.findings["Pneumonia"] = Finding("Pneumonia", str(rng.choice(["right", "left"])), "lower",
                                          int(rng.integers(1, 4)))
    elif cls == "COVID-19":
        p.findings["COVID-19"] = Finding("COVID-19", "bilateral", "lower", int(rng.integers(1, 4)))
    return p


def sample_patient(rng: np.random.Generator) -> Patient:
    p = Patient(age=int(rng.integers(20, 91)), sex=str(rng.choice(["Female", "Male"])))
    present = {name for name, prev in PREVALENCE.items() if rng.random() < prev}
    # heart failure travels together: edema makes a big heart and effusions likelier
    if "Edema" in present:
        if rng.random() < 0.5:
            present.add("Cardiomegaly")
        if rng.random() < 0.4:
            present.add("Pleural Effusion")
    if "Pneumonia" in present:
        present.discard("Consolidation")  # drawn as pneumonia's own patchy opacities
    for name in sorted(present):
        side = str(rng.choice(["right", "left", "bilateral"] if name in ("Pleural Effusion", "Atelectasis")
                              else ["right", "left"]))
        if name in ("Edema", "Cardiomegaly", "Enlarged Cardiomediastinum", "Support Devices", "Emphysema",
                    "Fibrosis", "Hernia", "COVID-19"):
            side = "bilateral"
        zone = str(rng.choice(["upper", "lower"])) if name == "Consolidation" else \
            str(rng.choice(["upper", "mid", "lower"])) if name == "Lung Lesion" else \
            "upper" if name == "Fibrosis" else "mid" if name == "Infiltration" else "lower"
        uncertain = name not in ("Support Devices", "Fracture") and rng.random() < UNCERTAIN_SHARE
        device = str(rng.choice(["endotracheal tube", "central venous catheter", "nasogastric tube"])) \
            if name == "Support Devices" else ""
        p.findings[name] = Finding(name, side, zone, int(rng.integers(1, 4)), uncertain, device)
    p.negated = [n for n in ROUTINELY_NEGATED if n not in p.findings and rng.random() < NEGATION_RATE]
    return p
