"""`bench mask`: what AttMIM and EntMLM hide for one image and report, as a PNG and as text/JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from bench.data.images import read_image, resize_and_pad
from bench.modeling.entities import entity_word_spans, tag_entities, word_spans
from bench.modeling.masking import TextMasker, select_patches
from bench.modeling.method import Method
from bench.modeling.towers import Tokenizer


def text_view(text_masking: DictConfig, tokenizer: Tokenizer, report: str, seed: int) -> dict:
    """{"words", "masked" (per word: any of its word-pieces hidden), "entities": [[first word, last word + 1,
    type], ...], "negated"/"uncertain" (per entity)} for one report."""
    masker = TextMasker.from_config(tokenizer, text_masking)
    enc = tokenizer.hf([report], truncation=True, max_length=tokenizer.max_length, return_offsets_mapping=True,
                       return_special_tokens_mask=True, return_tensors="np")
    offsets = enc["offset_mapping"][0]
    pieces = masker.choose(report, offsets, enc["special_tokens_mask"][0], np.random.default_rng(seed))
    spans = word_spans(report)
    masked = [any(offsets[i, 0] < end and offsets[i, 1] > start for i in pieces) for start, end in spans]
    entities = tag_entities(report)
    return {"words": [report[s:e] for s, e in spans], "masked": masked,
            "entities": [list(e) for e in entity_word_spans(report, entities)],
            "negated": [e.negated for e in entities], "uncertain": [e.uncertain for e in entities]}


def render_text(view: dict) -> str:
    words = [f"[{w}]" if m else w for w, m in zip(view["words"], view["masked"])]
    lines = [" ".join(words), "entities:"]
    for (start, end, kind), neg, unc in zip(view["entities"], view["negated"], view["uncertain"]):
        flags = ", negated" if neg else ", uncertain" if unc else ""
        lines.append(f"  {' '.join(view['words'][start:end])} ({kind}{flags})")
    return "\n".join(lines)


@torch.no_grad()
def image_view(method: Method, cfg: DictConfig, image_path: str, report: str, out: Path, seed: int) -> dict:
    """Score the image's patches against the report, choose the mask as training would, and write a PNG of
    three panels: the image, the score heat map over it, and the image with the hidden patches blacked out.
    Without a contrastive branch (or with random masking) there are no scores and the mask is random."""
    method.eval()
    image_cfg = cfg.model.image
    size = int(image_cfg.image_size)
    square = resize_and_pad(read_image(image_path), size)
    x = torch.from_numpy(square).float().div(255.0).sub(image_cfg.mean).div(image_cfg.std)
    x = x.expand(int(image_cfg.get("channels", 3)), -1, -1).unsqueeze(0)
    im = cfg.method.image_masking
    tower = method.image_tower
    n = tower.num_patches
    scores = None
    if getattr(method, "itc", False) and im.strategy == "attention":
        pooled_text, text_tokens = method.text_tower(method.tokenizer([report]))
        _, patch_tokens = tower(x)
        scores = method.patch_scores(patch_tokens, text_tokens, method.tokenizer([report]), pooled_text).float()
    torch.manual_seed(seed)
    mask = select_patches(scores, 1, n, im.mask_ratio, im.attention_share, im.min_visible)
    side = int(round(n ** 0.5))
    hidden = mask.masked[0].reshape(side, side).numpy()
    heat = None if scores is None else scores[0].reshape(side, side).numpy()
    _write_panels(square, heat, hidden, out)
    return {"png": str(out), "patches": n, "masked_patches": int(hidden.sum()), "scored": scores is not None}


def _write_panels(square: np.ndarray, heat: np.ndarray | None, hidden: np.ndarray, out: Path) -> None:
    size, side = square.shape[0], hidden.shape[0]
    gray = np.repeat(square[..., None], 3, axis=2).astype(np.float32)
    up = size // side
    if heat is not None:
        h = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        h = np.kron(h, np.ones((up, up)))
        colour = np.stack([h, 1.0 - np.abs(2 * h - 1.0), 1.0 - h], axis=-1) * 255.0  # blue -> green -> red
        overlay = 0.5 * gray + 0.5 * colour
    else:
        overlay = gray.copy()
    masked = gray.copy()
    masked[np.kron(hidden, np.ones((up, up), dtype=bool)).astype(bool)] = 0.0
    panels = np.concatenate([gray, np.full((size, 4, 3), 255.0), overlay, np.full((size, 4, 3), 255.0), masked], 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panels.clip(0, 255).astype(np.uint8)).save(out)
