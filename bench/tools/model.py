"""The public API (`from bench import MMCLIPModel, load_model`): a trained model as a library, embedding images
and reports in its joint space, comparing them, and labelling images zero-shot.

    from bench import MMCLIPModel, load_model

    model = MMCLIPModel.from_pretrained("exports/mmclip")      # a `bench export` folder, a run folder, a hub name
    image_features, text_features = model.encode("path/to/xray/image.jpg", "This X-ray shows signs of pneumonia.")
    model.classify("path/to/xray/image.jpg", ["Pneumonia", "Pleural Effusion"])

Images go through the harness's own reader and the model's own preprocessing, exactly as in evaluation
(bench.data.images, bench.data.image_datasets), so a feature computed here equals the one the evaluators cache.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from bench.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig
    from PIL.Image import Image as PILImage

    from bench.modeling.method import Method
    from bench.tools.export import Origin

    ImageInput = str | os.PathLike | PILImage | np.ndarray | torch.Tensor

__all__ = ["EmbeddingModel", "MMCLIPModel", "load_model"]


class EmbeddingModel:
    """A pretrained model with a joint image-text space (any method with one: clip, mmclip, mlip, ...).

    Build one with `from_pretrained(source)` (or `bench.load_model(source)`); `EmbeddingModel()` alone is the
    untrained default model of its method, for trying the API without weights. Every call runs batched, on the
    model's device, in eval mode and without gradients; features come back L2-normalised on that device.
    """

    method_name: ClassVar[str] = "clip"  # the method of `cls()` and the only one `cls.from_pretrained` accepts

    def __init__(self, device: str = "auto", batch_size: int = 32) -> None:
        """The untrained default model of `method_name` (configs/method/<name>.yaml, the default preset, seed 0):
        random weights, so its features mean nothing yet; a warning says so."""
        from bench.experiment.config import compose_config
        from bench.experiment.setup import quiet_libraries
        from bench.tools.export import build_keeping_random_state, unknown_origin

        quiet_libraries()
        cfg = compose_config(self.method_name)
        print(f"bench: {type(self).__name__}(): an untrained {self.method_name} model ({cfg.model.name} preset, random "
              f"weights); load a trained one with {type(self).__name__}.from_pretrained(...)", file=sys.stderr)
        method = build_keeping_random_state(cfg)
        source = f"untrained {self.method_name} ({cfg.model.name} preset, seed {cfg.seed})"
        self._attach(method, cfg, unknown_origin(method, source), device, batch_size)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str = "auto", batch_size: int = 32,
                        revision: str | None = None) -> EmbeddingModel:
        """Load a trained model from `source`: a folder `bench export` wrote (or `save_pretrained`), one of our run
        folders (or its final.pt; an unfinished run's checkpoint.pt loads with a warning), or a Hugging Face hub
        repository holding an export (`org/name` or `hf-hub:org/name`; needs the network once, then the hub's
        cache; only an export's safetensors are read from the hub, never a pickle). `device`: auto (CUDA where
        there is one), cpu, cuda, cuda:N."""
        from bench.experiment.checkpoints import load_weights, run_config, run_folder
        from bench.experiment.export import WEIGHTS, is_export, read_config
        from bench.experiment.setup import quiet_libraries
        from bench.tools.export import build_keeping_random_state, export_origin, run_origin

        quiet_libraries()
        path = Path(str(source)).expanduser()
        downloaded = not path.exists()
        if downloaded:
            path = _download(str(source), revision)
            if not is_export(path):
                raise UserError(f"{source}: the hub repository holds no medvlp-bench export (config.json with "
                                f"format medvlp-bench-model and model.safetensors)")
        written = None
        if is_export(path):
            cfg, written = read_config(path)
            weights = path.resolve() / WEIGHTS
        else:
            run_dir, weights = run_folder(str(path))
            cfg = run_config(run_dir)
        if cls.method_name != str(cfg.method.name) and cls is not EmbeddingModel:
            raise UserError(f"{source}: a {cfg.method.name} model, not {cls.method_name}; load it with "
                            f"bench.load_model({str(source)!r})")
        method = build_keeping_random_state(cfg)
        load_weights(method, weights)
        origin = export_origin(path.resolve(), written, method) if written is not None else \
            run_origin(run_dir, weights, cfg, method)
        model = cls.__new__(cls)
        model._attach(method, cfg, origin, device, batch_size)
        return model

    @classmethod
    def from_method(cls, method: Method, cfg: DictConfig, source: str = "a built method", device: str = "auto",
                    batch_size: int = 32) -> EmbeddingModel:
        """Wrap a method already built from `cfg` (e.g. by bench.experiment.pretraining.build_method). Its weights
        are no run's as far as this model knows: `save_pretrained` gives them an identity of their own."""
        from bench.tools.export import unknown_origin

        model = cls.__new__(cls)
        model._attach(method, cfg, unknown_origin(method, source), device, batch_size)
        return model

    def _attach(self, method: Method, cfg: DictConfig, origin: Origin, device: str, batch_size: int) -> None:
        from bench.data.image_datasets import ImagePreprocessor
        from bench.train.trainer import resolve_device

        source = origin.source
        self.origin = origin
        if not method.has_joint_space(cfg):
            raise UserError(f"{source}: {cfg.method.name} has no joint image-text space, so it cannot embed texts "
                            f"or compare them with images")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.method, self.cfg, self.source, self.batch_size = method.to(self.device).eval(), cfg, source, batch_size
        image = cfg.model.image
        self.image_size = int(image.image_size)
        channels = int(image.get("channels", 3))
        self.preprocess = ImagePreprocessor(self.image_size, image.mean, image.std, False, channels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.cfg.method.name!r}, ablation={self.cfg.ablation!r}, "
                f"source={self.source!r}, device={str(self.device)!r})")

    @property
    def logit_scale(self) -> float:
        """The model's learned inverse temperature (capped at 100, as zero-shot evaluation caps it)."""
        from bench.evaluation.protocols.zero_shot import zero_shot_scale

        return zero_shot_scale(self.method)

    # --- inputs -------------------------------------------------------------------------------------------

    def preprocess_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """[n, C, size, size] model inputs on the CPU from one image or a list. A path (JPG, PNG, DICOM), a PIL
        image or an array (2-D grey of any dtype; H x W x 1/3/4 uint8 colour) is read as the harness reads files:
        one grey channel, resized and padded to the model's square, normalised with its mean and std. A float
        tensor [C, size, size] or [n, C, size, size] is taken as already preprocessed."""
        if isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4:
            return self._checked_input(images, "the image batch")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise UserError("no images given")
        return torch.stack([self._one_image(item, i) for i, item in enumerate(items)])

    def _one_image(self, item: Any, index: int) -> torch.Tensor:
        from PIL import Image

        from bench.data.images import array_to_gray, pil_to_gray, read_image, resize_and_pad

        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.ndim == 3:
                return self._checked_input(item.unsqueeze(0), f"image {index}")[0]
            item = item.detach().cpu().numpy()
        if isinstance(item, (str, os.PathLike)):
            gray = read_image(item)
        elif isinstance(item, Image.Image):
            gray = pil_to_gray(item)
        elif isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[-1] in (1, 3, 4) and item.dtype == np.uint8:
            gray = pil_to_gray(Image.fromarray(item[..., 0] if item.shape[-1] == 1 else item))
        elif isinstance(item, np.ndarray) and item.ndim == 2:
            gray = array_to_gray(item)
        else:
            shape = f" of shape {tuple(item.shape)} ({item.dtype})" if hasattr(item, "shape") else ""
            raise UserError(f"image {index}: {type(item).__name__}{shape} is not an image; give a file path, a PIL "
                            f"image, a 2-D array, an H x W x 3 uint8 array, or a preprocessed float tensor")
        return self.preprocess(resize_and_pad(gray, self.image_size), None)

    def _checked_input(self, x: torch.Tensor, what: str) -> torch.Tensor:
        channels = self.preprocess.channels
        size = self.image_size
        if tuple(x.shape[1:]) not in ((channels, size, size), (1, size, size)):
            raise UserError(f"{what}: a float tensor is taken as preprocessed input of shape [n, {channels}, "
                            f"{self.image_size}, {self.image_size}], got {list(x.shape)}")
        return x.float()

    @staticmethod
    def _texts(texts: str | Sequence[str]) -> list[str]:
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise UserError("texts must be a string or a non-empty list of strings")
        return items

    # --- features -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """[n, embed_dim] L2-normalised joint-space features of one image or a list."""
        x = self.preprocess_images(images)
        return torch.cat([self.method.embed_image(x[i:i + self.batch_size].to(self.device)).float()
                          for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """[n, embed_dim] L2-normalised joint-space features of one text or a list (truncated to the model's
        max_length tokens, as in training)."""
        items = self._texts(texts)
        tokenizer = self.method.tokenizer
        return torch.cat([self.method.embed_text(tokenizer(items[i:i + self.batch_size]).to(self.device)).float()
                          for i in range(0, len(items), self.batch_size)])

    def encode(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features [n_images, d], text features [n_texts, d]), both L2-normalised."""
        return self.encode_image(images), self.encode_text(texts)

    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> torch.Tensor:
        """[n_images, n_texts] cosine similarities in the joint space (multiply by `logit_scale` for logits)."""
        image_features, text_features = self.encode(images, texts)
        return image_features @ text_features.T

    def classify(self, images: ImageInput | Sequence[ImageInput], labels: str | Sequence[str],
                 prompt_set: str = "chexzero", dataset: str | None = None, exclusive: bool = False) -> pd.DataFrame:
        """Zero-shot probabilities, one row per image and one column per label, scored as the zero-shot protocol
        scores them with its default settings (each class's prompts embedded and averaged, the model's own
        temperature) and `prompt_set` (a shipped set's name, see `bench list`, or a prompt-set file):
        each label's positive against its negative prompts (CheXzero's softmax) or, with `exclusive`, a softmax
        across the labels (one finding per image, as CheXpert 5x200 and COVIDx are scored). `dataset` picks the
        set's prompts for that dataset where it has its own (e.g. rsna's Pneumonia)."""
        import pandas as pd

        from bench.evaluation.prompt_sets import get_prompt_set
        from bench.evaluation.protocols.zero_shot import class_scores

        names = [labels] if isinstance(labels, str) else list(labels)
        prompts_of = get_prompt_set(prompt_set)
        try:
            prompts = prompts_of.for_task(dataset or "", names)
        except UserError as exc:
            raise UserError(f"{exc}; its labels: {', '.join(prompts_of.labels(dataset))}") from None
        if not exclusive and not all(prompts[label].negative for label in names):
            lacking = [label for label in names if not prompts[label].negative]
            raise UserError(f"prompt set {prompts_of.id} has no negative prompts for {', '.join(lacking)}: score with "
                            f"exclusive=True (a softmax across the labels) or a set with negatives (chexzero)")
        features = self.encode_image(images).cpu().numpy()
        with torch.no_grad():
            scores, _ = class_scores(self.method, features, prompts, names,
                                     "multi-class" if exclusive else "multi-label", "embedding", "pos-neg",
                                     self.logit_scale, self.device)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        index = [str(i) if isinstance(i, (str, os.PathLike)) else n for n, i in enumerate(items)]
        if len(index) != len(scores):  # a batch tensor: one row per image in it
            index = list(range(len(scores)))
        return pd.DataFrame(scores, index=index, columns=names)

    # --- saving -------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the model as `bench export` writes a run (weights, config.json, tokenizer, model card) and check
        the folder rebuilds it. Weights loaded from a finished run or an export, unchanged since, keep that run's
        identity, provenance, cost and evaluation tables; any other weights (untrained, changed, an unfinished
        run's) are saved under an identity of their own, so their records never pass for the run's."""
        from bench.tools.export import save_model

        return save_model(self.method, self.cfg, folder, self.origin)

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None) -> str:
        """Upload `save_pretrained`'s folder to the Hugging Face hub (online; `huggingface-cli login` or `token`);
        returns the repository's URL. `from_pretrained(repo_id)` loads it back anywhere."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload medvlp-bench model")
        return str(url)


class MMCLIPModel(EmbeddingModel):
    """MMCLIP (cross-modal attention-masked modelling) as a library: `MMCLIPModel.from_pretrained(source)`."""

    method_name = "mmclip"


def load_model(source: str | os.PathLike, device: str = "auto", batch_size: int = 32) -> EmbeddingModel:
    """The model of any method with a joint space from a run folder, an export or a hub repository (see
    `EmbeddingModel.from_pretrained`)."""
    return EmbeddingModel.from_pretrained(source, device, batch_size)


def _download(source: str, revision: str | None) -> Path:
    """A hub repository's snapshot (the hub's cache first); a clear error offline or for a missing path."""
    repo = source.removeprefix("hf-hub:")
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise UserError(f"{source}: no such file or folder (and not a hub repository name ORG/NAME)")
    try:
        from huggingface_hub import snapshot_download

        # an export's files only: never a pickle, whatever else the repository holds
        return Path(snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                                "*.model", "README.md"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, no access: one line says which
        raise UserError(f"{source}: not a local folder, and the hub repository could not be fetched "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
