"""medvlp-bench: pretrain, evaluate and compare medical vision-language models on chest X-rays."""
from bench._torchvision_cpu import install_hook as _install_torchvision_hook

_install_torchvision_hook()

__version__ = "0.1.0"
