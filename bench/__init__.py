"""medvlp-bench: pretrain, evaluate and compare medical vision-language models on chest X-rays."""
from pathlib import Path as _Path

from bench._torchvision_cpu import install_hook as _install_torchvision_hook

_install_torchvision_hook()

# In a source checkout methods/, datasets/ and configs/ sit beside bench/ (the top-level layout is fixed);
# an installed wheel has them inside bench/. Searching the checkout's root as well lets `bench.methods`,
# `bench.datasets` and `bench.configs` resolve when Python finds this folder first (e.g. run from the root).
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "methods").is_dir() and not (_Path(__file__).resolve().parent / "methods").is_dir():
    __path__.append(str(_checkout))

__version__ = "0.1.0"

# the public API (bench.tools.model, in the tools layer: it stands on everything below)
_PUBLIC = {"EmbeddingModel": "bench.tools.model", "MMCLIPModel": "bench.tools.model", "load_model": "bench.tools.model"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> object:
    # imported on first use: `import bench` (every CLI call) must not import torch
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
