"""Zero-shot classification: class prompts embedded by the text tower, scored against image embeddings.

Multi-label and binary tasks: `pos-neg` (CheXzero) scores each class by the softmax of its positive prompt's
similarity against its negative one ("no <finding>"), with the model's own logit scale; `cosine` uses the
raw similarity with the class prompts. Multi-class tasks (one finding per image, e.g. CheXpert 5x200,
COVIDx): the softmax over the classes' similarities, reported as accuracy and one-vs-rest AUC. Metrics
are computed over the whole test split.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.errors import UserError
from bench.evaluation.features import image_outputs, predictions_frame
from bench.method import Method
from bench.metrics import task_metrics

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


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def zero_shot(method: Method, data, cfg, device: torch.device, num_workers: int = 0) -> dict:
    mode = cfg.eval.zero_shot.mode
    if mode not in MODES:
        raise UserError(f"eval.zero_shot.mode must be one of {', '.join(MODES)}, got {mode!r}")
    task = data.task
    test = data.rows("test")
    images = image_outputs(method, test, method.embed_image, data.preprocessor(augment=False), data.cache,
                           cfg.eval.batch_size, device, num_workers)
    pos = _class_embeddings(method, task.prompts, task.labels, device).cpu().numpy()
    sim_pos = images @ pos.T
    # the model's own temperature where it has one (CLIP's cap of 100 otherwise)
    scale = min(100.0, float(method.logit_scale.detach().exp())) if hasattr(method, "logit_scale") else 100.0
    multiclass = not task.multilabel and len(task.labels) > 1
    if multiclass:
        scores = _softmax(scale * sim_pos)
    elif mode == "cosine":
        scores = sim_pos
    else:
        neg = _class_embeddings(method, task.negative_prompts, task.labels, device).cpu().numpy()
        scores = _softmax(scale * np.stack([sim_pos, images @ neg.T], axis=-1))[..., 0]
    y = test[task.labels].to_numpy(dtype=float)
    metrics, per_class = task_metrics(multiclass, y, scores, task.labels)
    return {"metrics": metrics, "per_class": per_class, "predictions": predictions_frame(test, task, y, scores),
            "n_test": len(test)}
