"""Dataset adapters: each reads one dataset's real on-disk format into the common manifest."""
from __future__ import annotations

from bench.datasets.base import (Adapter, Task, adapter_names, adapter_settings, get_adapter,  # noqa: F401
                                 register_adapter)
from bench.datasets import chexpert, covidx, mimic_cxr, nih, rsna, siim  # noqa: F401  (registration)
