"""Zero-shot classification: class prompts from named prompt sets (bench/evaluation/prompt_sets/), embedded by the text
tower and scored against the images' joint-space embeddings.

A class's prompts become one score per image by `aggregate`: `embedding` (the renormalised mean of the
prompt embeddings, as CLIP and CheXzero do), `mean` or `max` of the per-prompt similarities (MedCLIP's
ensemble and its default). Multi-class tasks (CheXpert 5x200, 3-class COVIDx) take the softmax across classes
(accuracy from the arg-max). Binary and multi-label tasks take, with `mode: pos-neg`, the softmax of each
class's positive against its negative prompts (CheXzero), or the raw cosine similarity with `mode: cosine`
or when the set has no negative prompts. Thresholds for F1/accuracy are chosen on the validation split.
Every configured prompt set is scored; the first one gives the record's metrics, all of them appear under
`prompt_sets`, and their spread under `prompt_spread`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.core.checks import list_of, one_of
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_protocol
from bench.evaluation.protocol import EvalContext, Protocol

if TYPE_CHECKING:
    from bench.evaluation.prompt_sets import ClassPrompts
    from bench.evaluation.result import ProtocolResult

np = lazy_module("numpy")
torch = lazy_module("torch")


def prompt_set(key: str, v: Any) -> str | None:
    from bench.evaluation.prompt_sets import get_prompt_set

    if not isinstance(v, str):
        return "a prompt set name (see `bench list`) or the path of a prompt set file"
    get_prompt_set(v)  # an unknown name or a broken file is its own one-line error
    return None


@register_protocol("zero-shot")
class ZeroShot(Protocol):
    order = 0
    frozen = True
    needs_joint_space = True
    defaults = {
        # bench/evaluation/prompt_sets/; the first gives the record's metrics, the spread covers all
        "prompt_sets": ["chexzero", "class-names", "gloria", "medklip", "synthetic-reports"],
        # embedding: renormalised mean of a class's prompt embeddings (CLIP, CheXzero); mean | max of per-prompt
        # similarities (MedCLIP)
        "aggregate": "embedding",
        # binary/multi-label: pos-neg softmax of "<finding>" vs its negative prompts (CheXzero), or cosine;
        # multi-class tasks always softmax across classes
        "mode": "pos-neg",
    }
    setting_checks = {"prompt_sets": list_of(prompt_set, nonempty=True, distinct=True),
                      "aggregate": one_of(("embedding", "mean", "max")), "mode": one_of(("pos-neg", "cosine"))}

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> ProtocolResult:
        return zero_shot(ctx)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _embed_texts(method, texts: list[str], device: torch.device, chunk: int = 256) -> np.ndarray:
    with torch.no_grad():
        out = [method.embed_text(method.tokenizer(texts[i:i + chunk]).to(device)).float().cpu().numpy()
               for i in range(0, len(texts), chunk)]
    return np.concatenate(out)


def _similarity(method, images: np.ndarray, prompts: list[str], aggregate: str, device: torch.device) -> np.ndarray:
    """One similarity per image between the images and a class's prompts."""
    emb = _embed_texts(method, prompts, device)
    if aggregate == "embedding":
        mean = emb.mean(0)
        return images @ (mean / max(np.linalg.norm(mean), 1e-12))
    sims = images @ emb.T
    return sims.mean(1) if aggregate == "mean" else sims.max(1)


def class_scores(method, images: np.ndarray, prompts: dict[str, ClassPrompts], labels: list[str], kind: str,
                 aggregate: str, mode: str, scale: float, device: torch.device) -> tuple[np.ndarray, str]:
    """(scores (n, classes), how they were scored)."""
    pos = np.stack([_similarity(method, images, list(prompts[c].positive), aggregate, device) for c in labels], 1)
    if kind == "multi-class":
        return _softmax(scale * pos), "softmax across classes"
    if mode == "cosine" or not all(prompts[c].negative for c in labels):
        return pos, "cosine" if mode == "cosine" else "cosine (the set has no negative prompts)"
    neg = np.stack([_similarity(method, images, list(prompts[c].negative), aggregate, device) for c in labels], 1)
    return _softmax(scale * np.stack([pos, neg], -1))[..., 0], "positive vs negative softmax"


def _spread(per_set: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, how much the result moves across prompt sets (over the sets where it is defined)."""
    out = {}
    for metric in next(iter(per_set.values())):
        v = np.array([r.get(metric, np.nan) for r in per_set.values()], dtype=float)
        v = v[~np.isnan(v)]
        if len(v):
            out[metric] = {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                           "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
    return out


def zero_shot_scale(method) -> float:
    """The inverse temperature of the class softmax: the model's own where it has one, capped at CLIP's 100."""
    return min(100.0, float(method.logit_scale.detach().exp())) if hasattr(method, "logit_scale") else 100.0


def _joint_embeddings(method, features: np.ndarray, device: torch.device, chunk: int = 4096) -> np.ndarray:
    with torch.no_grad():
        out = [method.project_image(torch.from_numpy(features[i:i + chunk]).to(device)).float().cpu().numpy()
               for i in range(0, len(features), chunk)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def zero_shot(ctx: EvalContext) -> ProtocolResult:
    from bench.evaluation.metrics import task_metrics
    from bench.evaluation.prompt_sets import get_prompt_set
    from bench.evaluation.result import ProtocolResult, val_thresholds

    zs, task, method = ctx.cfg.eval.zero_shot, ctx.data.task, ctx.method
    sets = [get_prompt_set(str(name)) for name in zs.prompt_sets]
    prompts = {s.id: s.for_task(ctx.data.name, task.labels) for s in sets}  # every set checked before any work
    split_rows, emb, report = {}, {}, ctx.report_split
    for split in dict.fromkeys(("val", report)):
        split_rows[split], features = ctx.features.get(method, ctx.data, split)
        emb[split] = _joint_embeddings(method, features, ctx.device)
    if split_rows[report].empty:
        raise UserError(f"zero-shot: the {report} split of {ctx.data.name} is empty")
    scale = zero_shot_scale(method)
    y = {s: rows[task.labels].to_numpy(dtype=float) for s, rows in split_rows.items()}
    per_set, primary = {}, None
    for s in sets:
        scored = {split: class_scores(method, emb[split], prompts[s.id], task.labels, task.kind, zs.aggregate,
                                      zs.mode, scale, ctx.device) for split in emb if len(emb[split])}
        thresholds = val_thresholds(task, y["val"], scored["val"][0]) if "val" in scored else None
        scores, how = scored[report]
        per_set[s.id] = task_metrics(task.kind, y[report], scores, task.labels, thresholds)[0]
        if primary is None:
            primary = (scores, thresholds, how, s)
    scores, thresholds, how, first = primary
    extra = {"prompt_set": first.id, "prompt_sets": per_set,
             "prompt_sets_sha256": {s.id: s.sha256 for s in sets}}
    if len(sets) > 1:
        extra["prompt_spread"] = _spread(per_set)
    chosen = {"scoring": how, "aggregate": zs.aggregate, "logit_scale": scale}
    return ProtocolResult(task, split_rows[report], y[report], scores, thresholds, chosen, extra)
