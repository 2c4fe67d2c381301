"""Exported models: a folder that loads with no results folder, no config tree and no network, in the Hugging
Face hub's layout, so `huggingface_hub` uploads it as it is and `snapshot_download` brings it back:

    model.safetensors     the method's whole state dict (what `final.pt` holds under "model")
    config.json           what the model is (method, preset, embedding size), how images are preprocessed, the
                          run's identity and provenance, and the configuration that rebuilds the model offline
    tokenizer files       the text tower's tokenizer as `save_pretrained` writes them (tokenizer.json, vocab.txt, ...)
    cost.json             what pretraining cost (bench.train.cost), where the run kept it
    README.md             a model card: provenance and the run's evaluation tables

The configuration is made self-contained when written: a tower the run loaded pretrained weights into (an
open_clip tag, a Hugging Face text model) is rebuilt from its architecture alone, its weights coming from
model.safetensors, and the tokenizer is read from the folder itself.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import to_plain
from bench.core.io import file_sha256
from bench.experiment.identity import config_hash, pretrain_hash
from bench.modeling.method import Method

FORMAT = "medvlp-bench-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
COST = "cost.json"
# HF config fields that say where a model came from, not what it is (they would break rebuilding it offline)
_ORIGIN_FIELDS = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                  "_attn_implementation_autoset")


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder this module wrote (its config.json names the format)."""
    config = Path(path).expanduser() / CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def preprocessing(cfg: DictConfig) -> dict:
    """How an image becomes the model's input (what a user of the weights outside this harness must repeat)."""
    image = cfg.model.image
    return {
        "reader": "bench.data.images.read_image: JPG/PNG (8/16 bit) and DICOM (modality and VOI LUT, MONOCHROME1 "
                  "inverted) as one grey channel, bright = dense, stretched to 0-255",
        "grayscale": True,
        "resize": "longer side to image_size keeping the aspect ratio (area-averaged when shrinking), then zero-padded "
                  "to a centred square",
        "image_size": int(image.image_size),
        "scale": "pixels / 255",
        "mean": to_plain(image.mean) if OmegaConf.is_list(image.mean) else float(image.mean),
        "std": to_plain(image.std) if OmegaConf.is_list(image.std) else float(image.std),
        "channels": int(image.get("channels", 3)),
        "channel_handling": "the grey channel repeated to `channels`",
    }


def self_contained(cfg: DictConfig, method: Method) -> dict:
    """The run's configuration (without how it ran or was evaluated) with nothing fetched when it is built: towers
    that loaded pretrained weights become their architectures, and the tokenizer is the folder's own."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in ("eval", "runtime", "results_dir")}
    image, text = plain["model"]["image"], plain["model"]["text"]
    if image.get("open_clip_name", "") and str(image["open_clip_name"]).startswith("hf-hub:"):
        raise UserError(f"model.image.open_clip_name={image['open_clip_name']}: an image tower whose architecture is "
                        f"on the hub cannot be exported self-contained")
    image["pretrained"] = None  # open_clip builds the named architecture; its weights are in model.safetensors
    if text.get("pretrained"):
        arch = {k: v for k, v in method.text_tower.encoder.config.to_dict().items() if k not in _ORIGIN_FIELDS}
        text["pretrained"], text["config"] = None, arch
    text["tokenizer"] = "."  # this folder: `read_config` makes it the folder's path
    return plain


def export_description(method: Method, cfg: DictConfig, identity: dict, provenance: dict) -> dict:
    """config.json of the export of `method`, built from `cfg`."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "method": str(cfg.method.name), "ablation": str(cfg.ablation), "model_preset": str(cfg.model.get("name")),
        "embed_dim": int(cfg.model.embed_dim), "joint_space": bool(method.has_joint_space(cfg)),
        "preprocessing": preprocessing(cfg),
        "tokenizer": {"files": ".", "max_length": int(cfg.model.text.max_length)},
        "identity": identity, "provenance": provenance, "config": self_contained(cfg, method),
    }


def write_export(method: Method, config: dict, out: Path, card: str, cost: Path | None = None) -> Path:
    """Write the folder `out` (which must not exist or be empty): `method`'s weights and tokenizer, `config`
    (`export_description`), the model card and the run's cost. Written into a temporary folder beside `out` and
    renamed, so a killed export leaves no half folder under the name."""
    from safetensors.torch import save_model

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose another or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_model(method, str(staging / WEIGHTS), metadata={"format": "pt"}, force_contiguous=True)
        method.tokenizer.hf.save_pretrained(str(staging))
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        (staging / CARD).write_text(card)
        if cost is not None and cost.is_file():
            shutil.copyfile(cost, staging / COST)
        for path in (staging, *staging.iterdir()):  # mkdtemp's private modes: a shared model is readable by all
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_config(folder: Path) -> tuple[DictConfig, dict]:
    """(the configuration that rebuilds the model, config.json as written) of an exported folder. Settings added
    to the harness since the export get today's defaults; the model's own are taken as they were."""
    from bench.experiment.config import compose_config

    folder = Path(folder).expanduser().resolve()
    try:
        written = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / CONFIG}: cannot be read as an exported model's config ({exc})") from None
    if written.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{folder / CONFIG}: format version {written['format_version']} is newer than this "
                        f"harness reads ({FORMAT_VERSION}); upgrade medvlp-bench")
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder}: an exported model without its weights ({WEIGHTS})")
    stored = OmegaConf.create(written["config"])
    defaults = compose_config(str(stored.method.name))
    OmegaConf.set_struct(defaults, False)
    cfg = OmegaConf.merge(defaults, stored)
    cfg.model.text.config = stored.model.text.config  # an architecture is replaced whole, never merged into another
    cfg.model.text.tokenizer = str(folder)
    return cfg, written


def export_identity(cfg: DictConfig, weights: Path) -> dict:
    """What the exported model is in the results store: its run's record identity and original weights."""
    return {"method": str(cfg.method.name), "ablation": str(cfg.ablation), "pretrain_hash": pretrain_hash(cfg),
            "pretrain_seed": int(cfg.seed), "config_hash": config_hash(cfg),
            "checkpoint": {"path": str(weights), "sha256": file_sha256(weights)}}


def export_provenance(run_dir: Path | None) -> dict:
    """Where the exported weights came from: the run folder (None: a model not loaded from one), its corpus
    summary, and who exported them when."""
    from bench import __version__
    from bench.core.provenance import git_state, library_versions

    corpus = None if run_dir is None else run_dir / "corpus.json"
    return {"run_dir": None if run_dir is None else str(run_dir),
            "corpus": json.loads(corpus.read_text()) if corpus is not None and corpus.is_file() else None,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bench_version": __version__,
            "git": git_state(), "libraries": library_versions()}

