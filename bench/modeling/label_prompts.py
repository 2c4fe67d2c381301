"""Disease-kind prompts: the text an image-only sample gets, written from its labels (MMCLIP's way of letting
labelled images without reports join image-text training).

Label values: 1 positive, 0 negative (stated absent), -1 uncertain, NaN not mentioned. One sentence per
finding from the templates, in the order positive, uncertain, negative; a sample with no positive and no
uncertain finding also gets the `normal` sentence.
"""
from __future__ import annotations

import math
from typing import Mapping

from omegaconf import DictConfig

from bench.core.errors import UserError

TEMPLATE_KEYS = ("positive", "uncertain", "negative", "normal")
NO_FINDING = "No Finding"


def finding_phrase(label: str, names: Mapping[str, str] | None = None) -> str:
    """How a label reads inside a sentence: an explicit name, else the label in lower case with `_` as space
    (NIH writes `Pleural_Thickening`)."""
    if names and label in names:
        return names[label]
    return label.replace("_", " ").lower()


def label_prompt(values: Mapping[str, float], templates: Mapping[str, str], names: Mapping[str, str] | None = None,
                 negatives: bool = True) -> str:
    """The prompt for one image from its label values (see the module docstring)."""
    groups: dict[str, list[str]] = {"positive": [], "uncertain": [], "negative": []}
    for label, value in values.items():
        if label == NO_FINDING or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        kind = {1.0: "positive", -1.0: "uncertain", 0.0: "negative"}.get(float(value))
        if kind is None:
            raise UserError(f"label {label!r} has value {value!r}; prompts take 1, 0, -1 or blank")
        groups[kind].append(finding_phrase(label, names))
    sentences = [_capitalise(templates[kind].format(finding=f)) for kind in ("positive", "uncertain")
                 for f in groups[kind]]
    if not sentences:
        sentences.append(templates["normal"])
    if negatives:
        sentences += [_capitalise(templates["negative"].format(finding=f)) for f in groups["negative"]]
    return " ".join(sentences)


def check_templates(cfg: DictConfig) -> dict[str, str]:
    templates = {k: cfg.get(k) for k in TEMPLATE_KEYS}
    missing = [k for k, v in templates.items() if not v]
    if missing:
        raise UserError(f"method.prompts.templates is missing {', '.join(missing)}")
    for k in ("positive", "uncertain", "negative"):
        if "{finding}" not in templates[k]:
            raise UserError(f"method.prompts.templates.{k} must contain {{finding}}, got {templates[k]!r}")
    return templates


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]
