"""Dataset adapters: each reads one dataset's real on-disk format into the common manifest."""
from __future__ import annotations

from bench.data.adapter import (  # noqa: F401
                                 Adapter,
                                 Task,
                                 adapter_names,
                                 adapter_settings,
                                 get_adapter,
                                 register_adapter,
)
from bench.datasets import chexpert, covidx, mimic_cxr, nih, rsna, siim  # noqa: F401  (registration)
