"""Evaluate open_clip-format CLIP models that the harness did not train.

Specs (what `bench eval --checkpoint` accepts besides our own run folders):

  open_clip:MODEL                  MODEL's architecture, randomly initialised (a baseline)
  open_clip:MODEL:TAG              open_clip's pretrained tag, e.g. open_clip:ViT-B-16:laion2b_s34b_b88k (downloads
                                   unless cached)
  open_clip:MODEL:/path/w.pt       a local weights file (a state dict or {"state_dict": ...}, .safetensors too);
                                   with `model_config=/path/MODEL.json` MODEL may be an architecture open_clip does
                                   not ship (the JSON is an open_clip model config: embed_dim, vision_cfg, text_cfg)
  open_clip:local-dir:/path/dir    a folder holding open_clip_config.json and its weights (a hub repo on disk)
  hf-hub:ORG/REPO                  a model on the Hugging Face hub (open_clip:hf-hub:ORG/REPO is the same); offline
                                   (HF_HUB_OFFLINE=1) only models already in the hub cache load

Every failure is a one-line `UserError` naming the spec. Weights are read with torch's `weights_only` loader, so
a file that needs arbitrary unpickling is refused rather than executed.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.core.errors import UserError
from bench.core.io import file_sha256
from bench.data.batch import TextBatch

OPEN_CLIP_PREFIX = "open_clip:"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")
LIST_MODELS_HINT = "valid names: python -c \"import open_clip; print(open_clip.list_models())\""
_STATE_DICT_MISMATCH = ("size mismatch", "Missing key", "Unexpected key", "Error(s) in loading state_dict")


def is_external_spec(spec: str) -> bool:
    """True for "open_clip:MODEL[:PRETRAINED]" and "hf-hub:ORG/REPO" specs; False for anything else (our run
    folders and .pt files are the caller's). A bare prefix counts, so that `load_external` can say what is
    missing instead of the spec being taken for a path."""
    return isinstance(spec, str) and (spec.startswith(OPEN_CLIP_PREFIX) or spec.startswith(HF_HUB_PREFIX))


@dataclass(frozen=True)
class _Source:
    """A parsed spec: what open_clip.create_model gets, and what to record about it."""

    spec: str
    kind: str                   # "builtin" (a model name), "hub" or "local-dir"
    model: str                  # create_model's model_name: a name, "hf-hub:ORG/REPO" or "local-dir:/abs"
    pretrained: str | None      # a tag, an absolute weights path, or None
    weights_file: Path | None   # the local weights file, when there is one
    config_file: Path | None    # the registered model config JSON, when given
    force_quick_gelu: bool = False  # the tag's weights were trained with QuickGELU, the config says GELU


def _one_line(text: str, limit: int = 300) -> str:
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _mismatch_summary(text: str) -> str:
    """torch's load_state_dict error, shortened: how many tensors do not fit, and the first of each kind."""
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                        r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    parts = []
    if shapes:
        name, ours, theirs = shapes[0]
        parts.append(f"{len(shapes)} size mismatch(es) (first: {name} is [{ours}] in the file, [{theirs}] in the model)")
    for kind in ("Missing", "Unexpected"):
        found = re.search(kind + r" key\(s\) in state_dict: (.*)", text)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {kind.lower()} key(s) (first: {keys[0] if keys else '?'})")
    return "; ".join(parts) or _one_line(text)


def _open_clip():
    import open_clip  # after `bench` is imported: its hook lets a CUDA torchvision import on a CPU torch

    return open_clip


def _register_config(spec: str, model: str, model_config: str) -> Path:
    """Add an open_clip model config JSON to open_clip's registry (named by its file stem, as open_clip does)."""
    open_clip = _open_clip()
    path = Path(os.path.expanduser(str(model_config))).resolve()
    if not path.is_file():
        raise UserError(f"{spec}: model config {path} does not exist")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{spec}: model config {path} is not readable JSON: {_one_line(exc)}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UserError(f"{spec}: model config {path} is not an open_clip model config (lacks {', '.join(missing)})")
    if path.suffix != ".json" or path.stem != model:
        raise UserError(f"{spec}: open_clip names a model config by its file name, so the config for {model!r} "
                        f"must be called {model}.json, not {path.name}")
    # Appending again moves this file to the end of open_clip's search path: later files win, so this config
    # is the one `model` means now even if another file of the same name was registered before.
    open_clip.add_model_config(path)
    if open_clip.get_model_config(model) != cfg:
        raise UserError(f"{spec}: open_clip did not take the model config {path} for {model!r}")
    return path


def _resolve_weights(spec: str, model: str, pretrained: str) -> tuple[str, Path | None]:
    """A pretrained tag of `model`, or a local weights file (absolute path)."""
    open_clip = _open_clip()
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return str(path.resolve()), path.resolve()
    if path.is_dir():
        hint = (f"; for a folder with open_clip_config.json use open_clip:local-dir:{path}"
                if (path / "open_clip_config.json").is_file() else "")
        raise UserError(f"{spec}: {path} is a folder, not a weights file{hint}")
    if open_clip.get_pretrained_cfg(model, pretrained):
        return pretrained, None
    if "/" in pretrained or os.sep in pretrained or pretrained.startswith((".", "~")) \
            or pretrained.lower().endswith(WEIGHT_SUFFIXES):
        raise UserError(f"{spec}: weights file {path} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(model)
    known = f"known tags: {', '.join(tags)}" if tags else "open_clip knows no pretrained tags for it; give a weights file"
    raise UserError(f"{spec}: {pretrained!r} is neither a weights file nor a pretrained tag of {model} ({known})")


def _parse(spec: str, model_config: str | None) -> _Source:
    if not is_external_spec(spec):
        raise UserError(f"{spec!r} is not an open_clip spec (open_clip:MODEL[:PRETRAINED] or hf-hub:ORG/REPO)")
    rest = spec[len(OPEN_CLIP_PREFIX):] if spec.startswith(OPEN_CLIP_PREFIX) else spec
    if rest.startswith(HF_HUB_PREFIX) or rest.startswith(LOCAL_DIR_PREFIX):
        if model_config:
            raise UserError(f"{spec}: a model config applies only to open_clip:MODEL specs (this source brings its own)")
        if rest.startswith(HF_HUB_PREFIX):
            repo = rest[len(HF_HUB_PREFIX):]
            if not repo or repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
                raise UserError(f"{spec}: a hub model is named hf-hub:ORG/REPO")
            return _Source(spec, "hub", HF_HUB_PREFIX + repo, None, None, None)
        folder = Path(os.path.expanduser(rest[len(LOCAL_DIR_PREFIX):])).resolve()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{spec}: {folder} is not a folder with open_clip_config.json")
        weights = _find_checkpoint_in_dir(folder)
        if weights is None:
            raise UserError(f"{spec}: no weights (*.safetensors, *.bin, *.pth) in {folder}")
        return _Source(spec, "local-dir", LOCAL_DIR_PREFIX + str(folder), str(weights), weights, None)
    model, _, pretrained = rest.partition(":")
    if not model:
        raise UserError(f"{spec}: names no model (open_clip:MODEL[:PRETRAINED]; {LIST_MODELS_HINT})")
    config_file = _register_config(spec, model, model_config) if model_config else None
    open_clip = _open_clip()
    if model.replace("/", "-") not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        maybe = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"{spec}: unknown open_clip model {model!r}{maybe}; {LIST_MODELS_HINT}; a custom "
                        "architecture needs its config JSON (model_config)")
    if not pretrained:
        return _Source(spec, "builtin", model, None, None, config_file)
    pretrained, weights = _resolve_weights(spec, model, pretrained)
    # e.g. ViT-B-16:openai: the tag declares QuickGELU, ViT-B-16's config does not; open_clip only warns and
    # builds GELU, which gives subtly wrong features, so the activation the weights were trained with is forced
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if weights is None else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu")) and not (open_clip.get_model_config(model) or {}).get("quick_gelu")
    return _Source(spec, "builtin", model, pretrained, weights, config_file, quick_gelu)


def _find_checkpoint_in_dir(folder: Path) -> Path | None:
    """The weights file open_clip itself picks in a local-dir folder."""
    try:
        from open_clip.factory import _find_checkpoint_in_dir as find
    except ImportError:  # a private helper: if it moves, fall back to its first choices
        names = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
        return next((folder / n for n in names if (folder / n).is_file()), None)
    found = find(folder)
    return Path(found) if found else None


def _build(source: _Source, device: str) -> nn.Module:
    open_clip = _open_clip()
    spec = source.spec
    try:
        model = open_clip.create_model(source.model, pretrained=source.pretrained if source.kind == "builtin" else None,
                                       device=device, require_pretrained=source.kind != "builtin" or bool(source.pretrained),
                                       force_quick_gelu=source.force_quick_gelu, weights_only=True)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/pickle errors alike
        msg = _one_line(exc)
        if source.kind == "hub":
            raise UserError(f"{spec}: could not load from the Hugging Face hub (no network, offline mode "
                            f"(HF_HUB_OFFLINE=1) with the model not cached, or no such repo): {msg}") from None
        if source.weights_file is not None:
            if any(s in str(exc) for s in _STATE_DICT_MISMATCH):
                raise UserError(f"{spec}: the weights in {source.weights_file.name} do not fit the architecture "
                                f"{source.model}: {_mismatch_summary(str(exc))}") from None
            raise UserError(f"{spec}: could not load the weights file {source.weights_file}: {msg}") from None
        if source.pretrained:
            raise UserError(f"{spec}: could not get the pretrained weights {source.pretrained!r} of {source.model} "
                            f"(offline, or not in open_clip's cache?): {msg}") from None
        raise UserError(f"{spec}: open_clip could not build {source.model}: {msg}") from None
    return model.eval()


def _image_cfg(spec: str, model: nn.Module) -> DictConfig:
    open_clip = _open_clip()
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size")
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise UserError(f"{spec}: non-square input size {tuple(size)} is not supported (the harness feeds S x S images)")
        size = size[0]
    mean, std = list(pp.get("mean", ())), list(pp.get("std", ()))
    if size is None or len(mean) != 3 or len(std) != 3:
        raise UserError(f"{spec}: the model does not say its input size and 3-channel mean/std ({pp})")
    return OmegaConf.create({"image_size": int(size), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                             "channels": 3})


class OpenCLIPTokenizer:
    """open_clip's tokenizer for a model, speaking the harness's TextBatch. Sequences are padded to the model's
    context length; attention_mask marks tokens that are not padding (input_ids != the pad id: 0 for open_clip's
    CLIP BPE tokenizer, the Hugging Face tokenizer's pad id otherwise). The model itself reads only input_ids
    (open_clip text towers find the end of the text themselves), so the mask is for callers that want it."""

    def __init__(self, tokenizer, context_length: int, vocab_size: int | None):
        self.open_clip = tokenizer
        self.max_length = int(context_length)
        self.vocab_size = vocab_size
        hf = getattr(tokenizer, "tokenizer", None)
        pad = getattr(hf, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def __call__(self, texts: list[str]) -> TextBatch:
        ids = self.open_clip(list(texts), context_length=self.max_length).long()
        return TextBatch(ids, (ids != self.pad_id).long())


class ExternalCLIP(nn.Module):
    """An open_clip model seen through the evaluator's side of bench.modeling.method.Method. encode_image gives open_clip's
    projected (joint-space), unnormalised image features, which is what linear probes and fine-tuning see here;
    images arrive (B, 3, S, S) already normalised with `image_cfg`'s mean/std."""

    joint_space = True

    def __init__(self, model: nn.Module, tokenizer: OpenCLIPTokenizer, name: str, identity: dict,
                 image_cfg: DictConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.identity = identity
        self.image_cfg = image_cfg
        self.image_width = self._feature_width()
        self.eval()

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned log logit scale (callers take .exp())."""
        return self.model.logit_scale

    def _feature_width(self) -> int:
        width = getattr(getattr(self.model, "visual", None), "output_dim", None)
        if isinstance(width, int) and width > 0:
            return width
        size = int(self.image_cfg.image_size)
        param = next(self.model.parameters())
        with torch.no_grad():  # towers that do not say their width (timm): one dummy image
            out = self.model.encode_image(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
        return int(out.shape[-1])

    def image_modules(self) -> tuple[str, ...]:
        """What fine-tuning trains (with a head): the image tower and its projection."""
        return ("model.visual",)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.encode_image(images))

    def embed_text(self, text: TextBatch) -> torch.Tensor:
        ids = text.input_ids.to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(ids), dim=-1)


def _display_name(source: _Source) -> str:
    if source.kind == "hub":
        return source.model
    if source.kind == "local-dir":
        return f"{OPEN_CLIP_PREFIX}{LOCAL_DIR_PREFIX}{Path(source.model[len(LOCAL_DIR_PREFIX):]).name}"
    if source.pretrained is None:
        return f"{OPEN_CLIP_PREFIX}{source.model}"
    tag = source.weights_file.name if source.weights_file is not None else source.pretrained
    return f"{OPEN_CLIP_PREFIX}{source.model}:{tag}"


def load_external(spec: str, model_config: str | None = None, device: str = "cpu") -> ExternalCLIP:
    """Build an open_clip model from a spec (see the module docstring) and wrap it as an ExternalCLIP.

    open_clip.create_model(MODEL, pretrained=TAG_OR_FILE) for open_clip:MODEL[:...] specs (the model
    create_model_and_transforms returns, without the transforms: the harness preprocesses images itself), and
    create_model("hf-hub:ORG/REPO") for hub specs. `model_config` (an open_clip model config JSON named MODEL.json)
    is registered with open_clip.add_model_config first, so custom architectures load offline."""
    source = _parse(spec, model_config)
    model = _build(source, device)
    image_cfg = _image_cfg(spec, model)
    open_clip = _open_clip()
    context_length = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", None)
    try:
        tokenizer = open_clip.get_tokenizer(source.model, context_length=context_length)
    except Exception as exc:  # a Hugging Face tokenizer that is neither cached nor reachable
        raise UserError(f"{spec}: could not load the model's tokenizer: {_one_line(exc)}") from None
    if context_length is None:
        context_length = getattr(tokenizer, "context_length", None) or 77
    vocab_size = getattr(model, "vocab_size", None) or getattr(getattr(model, "text", None), "vocab_size", None)
    identity = {
        "spec": spec,
        "model": source.model,
        "pretrained": source.pretrained,
        "sha256": file_sha256(source.weights_file) if source.weights_file is not None else None,
        "config_sha256": file_sha256(source.config_file) if source.config_file is not None else None,
    }
    return ExternalCLIP(model, OpenCLIPTokenizer(tokenizer, context_length, vocab_size), _display_name(source),
                        identity, image_cfg)
