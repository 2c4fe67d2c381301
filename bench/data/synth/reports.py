"""Radiology reports written from a patient's findings, in MIMIC-CXR's free-text layout.

Sentences carry location, severity, negation ("No pleural effusion.") and uncertainty ("Possible ..."),
so that the text states exactly what the image shows and the labels in the CSVs follow the text.
"""
from __future__ import annotations

import textwrap

import numpy as np

from bench.data.synth.findings import Finding, Patient

SEVERITY = {1: "small", 2: "moderate", 3: "large"}
DEGREE = {1: "mild", 2: "moderate", 3: "severe"}
HEDGES = ("possible", "questionable", "probable")


def _positive(f: Finding, rng: np.random.Generator) -> str:
    n = f.name
    if n == "Cardiomegaly":
        return str(rng.choice([f"{DEGREE[f.severity]} cardiomegaly", f"the heart is {DEGREE[f.severity]}ly enlarged"]))
    if n == "Pleural Effusion":
        s = "s" if f.side == "bilateral" else ""
        return f"{SEVERITY[f.severity]} {f.side} pleural effusion{s}"
    if n == "Consolidation":
        return f"consolidation in the {f.side} {f.zone} lobe"
    if n == "Pneumonia":
        return f"multifocal patchy opacities in the {f.side} lung consistent with pneumonia"
    if n == "Edema":
        return str(rng.choice([f"{DEGREE[f.severity]} pulmonary edema", f"{DEGREE[f.severity]} interstitial edema"]))
    if n == "Atelectasis":
        where = "bibasilar" if f.side == "bilateral" else f"{f.side} basilar"
        return str(rng.choice([f"{where} atelectasis", f"plate-like atelectasis at the {f.side} lung base"
                               if f.side != "bilateral" else "plate-like atelectasis at both lung bases"]))
    if n == "Pneumothorax":
        return f"{SEVERITY[f.severity]} {f.side} apical pneumothorax"
    if n == "Lung Lesion":
        if f.severity == 3:
            return f"a {int(rng.integers(4, 7))} cm mass in the {f.side} {f.zone} lung"
        return f"a {6 + 6 * f.severity} mm nodule in the {f.side} {f.zone} lung"
    if n == "Emphysema":
        return "hyperinflated lungs with flattened hemidiaphragms, consistent with emphysema"
    if n == "Fibrosis":
        return "reticular opacities in both upper lungs compatible with pulmonary fibrosis"
    if n == "Hernia":
        return "retrocardiac air-fluid level consistent with a hiatal hernia"
    if n == "Infiltration":
        return f"patchy infiltrate in the {f.side} mid lung"
    if n == "COVID-19":
        return "bilateral peripheral ground-glass opacities in the lower lungs, typical of covid-19 pneumonia"
    if n == "Enlarged Cardiomediastinum":
        return "the mediastinum is widened"
    if n == "Support Devices":
        return f"{f.device} in standard position"
    if n == "Fracture":
        return f"fracture of the {f.side} sixth posterior rib"
    if n == "Pleural Other":
        return f"{f.side} pleural thickening"
    raise ValueError(n)


NEGATIVE = {
    "Pleural Effusion": ["no pleural effusion", "no pleural effusion is seen"],
    "Pneumothorax": ["no pneumothorax", "there is no pneumothorax"],
    "Consolidation": ["no focal consolidation", "no consolidation"],
    "Edema": ["no pulmonary edema", "no edema"],
    "Cardiomegaly": ["no cardiomegaly", "heart size is normal without cardiomegaly"],
}
IMPRESSION_NORMAL = ["no acute cardiopulmonary process", "no acute intrathoracic abnormality"]
INDICATIONS = ["shortness of breath", "cough and fever", "chest pain", "evaluate for pneumonia",
               "preoperative assessment", "hypoxia"]


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:] + "."


def write_report(p: Patient, rng: np.random.Generator) -> tuple[str, str]:
    """Return (findings, impression) section texts."""
    findings, impression = [], []
    for f in sorted(p.findings.values(), key=lambda f: f.name):
        phrase = _positive(f, rng)
        if f.uncertain:
            phrase = f"{rng.choice(HEDGES)} {phrase}" if not phrase.startswith("the ") else \
                f"{phrase}, which may be artifactual"
        findings.append(_sentence(phrase))
        if f.name != "Support Devices":
            impression.append(_sentence(phrase))
    for name in p.negated:
        findings.append(_sentence(str(rng.choice(NEGATIVE[name]))))
    if "Pneumothorax" not in p.findings and "Pneumothorax" not in p.negated:
        findings.append("The lungs are otherwise clear." if p.findings else "The lungs are clear.")
    order = rng.permutation(len(findings))
    findings_text = " ".join(findings[i] for i in order)
    impression_text = " ".join(impression) if impression else _sentence(str(rng.choice(IMPRESSION_NORMAL)))
    return findings_text, impression_text


def mimic_report_file(findings: str, impression: str, rng: np.random.Generator, view: str) -> str:
    """The whole report file: banner, leading-space upper-case headers, 79-column wrapping, ___ for PHI."""
    def section(header: str, body: str) -> str:
        prefix = f" {header}: "
        wrapped = textwrap.fill(body, width=79, initial_indent=" " * len(prefix), subsequent_indent=" ")
        return prefix + wrapped[len(prefix):]

    views = "PA AND LAT" if view == "PA" else "PORTABLE AP"
    parts = [
        "                                 FINAL REPORT",
        section("EXAMINATION", f"CHEST ({views})"),
        "",
        section("INDICATION", f"___-year-old with {rng.choice(INDICATIONS)}."),
        "",
        section("TECHNIQUE", f"Chest {views.lower()}."),
        "",
        section("COMPARISON", "___."),
        "",
        section("FINDINGS", findings),
        "",
        section("IMPRESSION", impression),
    ]
    return "\n".join(parts) + "\n"
