"""Reports split into sentences, for methods that match image regions with sentences (MLIP's patch-sentence
matching). A rule splitter, not a trained one: radiology reports are short declarative sentences, and the
rules are the ones that matter for them (decimals and common abbreviations do not end a sentence)."""
from __future__ import annotations

import re

# a sentence ends at . ! ? followed by white space and then a capital, a digit or an opening bracket/quote; the
# look-behinds keep "1.5 cm", "e.g. the", "Dr. X" and list markers ("1. The heart") in one sentence
_BOUNDARY = re.compile(r"(?<![A-Z][a-z]\.)(?<!\b[a-z]\.)(?<!\b\d\.)(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "approx.", "dr.", "no.", "cf.")


def split_sentences(text: str, max_sentences: int | None = None, deduplicate: bool = True) -> list[str]:
    """The report's sentences in order, white space collapsed; with `deduplicate` a sentence that occurs again
    (MIMIC-CXR's impression often repeats the findings) is kept once (compared case- and space-insensitively);
    the first `max_sentences` are returned. A text without a boundary is one sentence; an empty one none."""
    pieces = [" ".join(p.split()) for p in _BOUNDARY.split(text)]
    merged: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if merged and merged[-1].lower().endswith(_ABBREVIATIONS):
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    if deduplicate:
        unique: dict[str, str] = {}
        for sentence in merged:
            unique.setdefault(sentence.lower().rstrip(".!? "), sentence)
        merged = list(unique.values())
    return merged[:max_sentences] if max_sentences is not None else merged
