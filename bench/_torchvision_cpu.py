"""Let a CUDA build of torchvision import on a CPU-only torch.

PyPI only has CUDA builds of torchvision; on a CPU torch their compiled ops (`_C.so`) cannot load, and
torchvision's import then dies registering fake kernels for `torchvision::nms`/`qnms`. transformers,
timm and open_clip all import torchvision, so one broken wheel breaks every model. Defining the two
op schemas first lets the pure-Python parts (transforms, FrozenBatchNorm2d, ...) import; only the
compiled ops (nms, image codecs) stay unavailable, and the harness uses neither.

Where the extension loads (any matching CUDA or CPU pair), this does nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_library = None  # keeps the op definitions alive for the whole process


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.*"):
            if lib.suffix in {".so", ".pyd", ".dylib"}:
                try:
                    torch.ops.load_library(str(lib))
                    return True
                except (OSError, RuntimeError):
                    return False
    return False


def install() -> None:
    """Define torchvision's unconditionally-registered op schemas if its extension cannot load."""
    global _library
    if _library is not None or _extension_loads():
        return
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `install()` just before the first `import torchvision`, so `bench --help` stays fast."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            install()
        return None


def install_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
