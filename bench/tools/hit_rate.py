"""`bench mask --dataset D --stats`: AttMIM's hit rate on a dataset's images with ground-truth finding masks.

Each image with ground truth (`Adapter.finding_mask`: a synthetic sidecar, SIIM's RLE masks, RSNA's boxes)
is paired with a text, masked as training would mask it (`mask_probe`: AttMIM scores, then
`select_patches`), and the hidden patches are compared with the patches on a finding
(`bench.data.finding_masks`, coverage >= COVERAGE_THRESHOLD). The text: `--report TEXT` for every image when
given; else the image's own report (MIMIC-CXR); else the disease-kind prompt the pretraining corpus would
write from the image's labels (`method.prompts.templates`: "There is pneumothorax.", "No pneumothorax.").
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.registry import DATASETS
from bench.data.finding_masks import COVERAGE_THRESHOLD, ground_truth_grid
from bench.data.image_datasets import ImagePreprocessor
from bench.data.loading import dataset_root, dataset_settings, load_dataset
from bench.experiment.pretraining import HitRateProbe, corpus_channels
from bench.modeling.label_prompts import check_templates, label_prompt
from bench.modeling.method import Method

STATISTICS = ("hit_rate", "finding_share", "lift")


def mask_stats(cfg: DictConfig, method: Method, dataset: str, split: str = "test", limit: int | None = None,
               report: str | None = None, seed: int = 0, model: str = "") -> dict:
    """The hit rate, finding share and lift of `method`'s image masks over `split`'s images of `dataset` that
    have ground truth (the first `limit` of them in split order), with what they were measured on."""
    if not getattr(method, "mim", False) or not callable(getattr(method, "mask_probe", None)):
        raise UserError(f"method {cfg.method.name} has no image masking to measure (AttMIM is MMCLIP's "
                        f"method.image_masking); try --method mmclip")
    data = load_dataset(cfg, dataset, with_reports=True, labels_as_written=True)
    rows = data.rows(split)
    adapter = DATASETS.get(dataset)(dataset_root(cfg, dataset), dataset_settings(cfg, dataset))
    tower = method.image_tower
    kept, grid = ground_truth_grid(range(len(rows)), lambda i: adapter.finding_mask(rows.iloc[i]), tower.image_size,
                                   tower.patch_size, limit)
    if not kept:
        raise UserError(f"{dataset}: none of the {len(rows)} images of its {split} split has ground-truth finding "
                        f"masks (a .findings.npz sidecar beside the image, or the dataset's own annotations such as "
                        f"SIIM's RLE masks and RSNA's boxes)")
    picked = rows.iloc[kept].reset_index(drop=True)
    texts, source = _texts(cfg, data, picked, report)
    image = cfg.model.image
    preprocess = ImagePreprocessor(image.image_size, image.mean, image.std, False, corpus_channels(image))
    images = torch.stack([preprocess(data.cache.get(p), None) for p in picked["image_path"]])
    method.eval()
    with torch.no_grad():
        result = HitRateProbe(images, texts, torch.from_numpy(grid), seed=seed).measure(method)
    im = cfg.method.image_masking
    return {"dataset": dataset, "split": split, "images": result.images,
            "images_with_finding": int(grid.any(1).sum()), "patches": int(grid.shape[1]),
            "hidden_per_image": result.hidden // max(result.images, 1), "strategy": str(im.strategy),
            "coverage_threshold": COVERAGE_THRESHOLD, "texts": source, "model": model,
            **{k: getattr(result, k) for k in STATISTICS}}


def _texts(cfg: DictConfig, data, rows, report: str | None) -> tuple[list[str], str]:
    """One text per row, and where they come from."""
    if report:
        return [report] * len(rows), "--report"
    if "report" in rows.columns:
        return [str(t) for t in rows["report"]], "each image's report"
    prompts = cfg.method.get("prompts")
    if prompts is None:
        raise UserError(f"{data.name} has no reports and method {cfg.method.name} writes no prompts: give --report")
    templates, names = check_templates(prompts.templates), to_plain(prompts.names)
    labels = data.labels_as_written(rows)
    texts = [label_prompt(values, templates, names, bool(prompts.negatives)) for values in labels.to_dict("records")]
    return texts, "prompts written from each image's labels (method.prompts.templates)"


def render_stats(stats: dict) -> str:
    """The measurement's context, then one line per statistic."""
    setting = (f"{stats['dataset']} {stats['split']}: {stats['images']} images with ground truth "
               f"({stats['images_with_finding']} with a finding), {stats['patches']} patches each, "
               f"{stats['hidden_per_image']} hidden ({stats['strategy']} masking); a patch is on a finding when "
               f">= {stats['coverage_threshold']:g} of it is")
    lines = [setting, f"model: {stats['model']}", f"texts: {stats['texts']}"]
    for key in STATISTICS:
        value = stats[key]
        lines.append(f"{key}: {'n/a' if value is None else f'{value:.4f}'}")
    return "\n".join(lines)
