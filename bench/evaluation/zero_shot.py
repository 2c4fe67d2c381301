"""Zero-shot classification: class prompts embedded by the text tower, scored against image embeddings.

Modes: `cosine` scores each class by the mean cosine similarity with its prompts; `pos-neg` (CheXzero)
scores it by the softmax of the positive prompt's similarity against the negative one's ("no <finding>"),
with the model's own logit scale. Metrics are computed over the whole test split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from bench.datasets.base import Task
from bench.errors import UserError
from bench.evaluation.features import eval_preprocessor, image_outputs, predictions_frame
from bench.method import Method
from bench.metrics import auc_per_class, macro

MODES = ("cosine", "pos-neg")


@torch.no_grad()
def _class_embeddings(method: Method, prompts: dict[str, list[str]], labels: list[str],
                      device: torch.device) -> torch.Tensor:
    """One L2-normalised embedding per class: the renormalised mean of its prompts' embeddings."""
    method.eval()
    out = []
    for name in labels:
        if not prompts.get(name):
            raise UserError(f"zero-shot: no prompt for class {name!r}")
        emb = method.embed_text(method.tokenizer(prompts[name]).to(device)).float().mean(0)
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.stack(out)


def zero_shot(method: Method, manifest: pd.DataFrame, task: Task, cfg, device: torch.device,
              num_workers: int = 0) -> dict:
    mode = cfg.eval.zero_shot.mode
    if mode not in MODES:
        raise UserError(f"eval.zero_shot.mode must be one of {', '.join(MODES)}, got {mode!r}")
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images = image_outputs(method, test, method.embed_image, eval_preprocessor(cfg), cfg.eval.batch_size,
                           device, num_workers)
    pos = _class_embeddings(method, task.prompts, task.labels, device).cpu().numpy()
    sim_pos = images @ pos.T
    if mode == "cosine":
        scores = sim_pos
    else:
        neg = _class_embeddings(method, task.negative_prompts, task.labels, device).cpu().numpy()
        # the model's own temperature where it has one (CLIP's cap of 100 otherwise)
        scale = min(100.0, float(method.logit_scale.detach().exp())) if hasattr(method, "logit_scale") else 100.0
        logits = scale * np.stack([sim_pos, images @ neg.T], axis=-1)
        logits -= logits.max(-1, keepdims=True)
        scores = np.exp(logits[..., 0]) / np.exp(logits).sum(-1)
    y = test[task.labels].to_numpy(dtype=float)
    per_class = auc_per_class(y, scores, task.labels)
    return {"metrics": {"auc": macro(per_class)}, "per_class": {"auc": per_class},
            "predictions": predictions_frame(test, task, y, scores), "n_test": len(test)}

