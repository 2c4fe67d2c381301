"""What an evaluation protocol is, and how one runs.

A protocol is a plug-in: one module in bench/evaluation/protocols/ (or a third party's, named by a
`medvlp_bench.protocols` entry point) with a `Protocol` subclass registered by `@register_protocol(name)`. It
declares what the rest of the harness needs to know without running it (which jobs the evaluation settings
make, whether it reads frozen features, whether it needs a joint image-text space, which datasets it applies
to (`requires`: what their adapters must provide, such as reports or masks), its settings under
`eval.<section>` and their checks) and one `run`. The experiment chain, sweeps, the config and the tables
read everything else from the registry (`bench.core.registry.PROTOCOLS`).

A protocol computes its numbers on the dataset's test split, fits what it fits on train and chooses what
it chooses on val. A sweep sets the context's `report_split` to `val`: the protocol then reports on the
split it chooses on (the best validation value over its choices, the usual tuning objective) and never
touches test.

Listing the protocols imports their modules, so a protocol module imports torch, scikit-learn and the
harness's heavy parts inside `run`, never at the top: naming the protocols (`bench list`, config checks,
tables) stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from bench.core.checks import Check

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from omegaconf import DictConfig

    from bench.data.loading import LoadedDataset
    from bench.evaluation.features import FeatureCache
    from bench.evaluation.result import ProtocolResult


@dataclass
class EvalContext:
    """What one evaluation reads: the model (a `Method`, or an external CLIP with the same encoders), one
    loaded dataset, the composed config, the device, the model's feature cache, and the split to report on."""

    method: torch.nn.Module
    data: LoadedDataset
    cfg: DictConfig
    device: torch.device
    features: FeatureCache
    num_workers: int = 0
    report_split: str = "test"

    def train_rows(self, fraction: float, seed: int) -> pd.DataFrame:
        """The train rows of a label fraction: the frozen shared list, or the evaluation seed's own with
        `eval.fraction_subsets: per-seed`."""
        per_seed = self.cfg.eval.fraction_subsets == "per-seed"
        return self.data.rows("train", fraction, seed if per_seed and fraction < 1 else None)


class Protocol:
    """Base class of an evaluation protocol (see the module docstring)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # where its columns go in tables, and its place in listings
    frozen: ClassVar[bool] = False  # reads the encoder's cached features and changes no weight
    fits_labels: ClassVar[bool] = False  # one record per label fraction x evaluation seed; else one per dataset
    needs_joint_space: ClassVar[bool] = False  # only for models that embed images and texts in one space
    defaults: ClassVar[dict[str, Any]] = {}  # its settings, as the config holds them under eval.<section>
    setting_checks: ClassVar[dict[str, Check]] = {}  # valid values of those settings (key within the section)
    # runs only on datasets whose adapter provides one of these (`Adapter.provides`); empty: on every dataset
    requires: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def is_metric(cls, name: str) -> bool:
        """Whether its records can hold metric `name` (a sweep's objective is checked with it before any work); by
        default the classification metrics of `bench.evaluation.metrics.METRICS`."""
        from bench.evaluation.metrics import METRICS

        return any(name in names for names in METRICS.values())

    @classmethod
    def headline_metrics(cls, present: Sequence[str]) -> list[str]:
        """Of the metrics `present` in its records, those a report shows when the reader names none of them: by
        default the AUC, the field's headline for classification."""
        return [m for m in ("auc",) if m in present]

    @classmethod
    def applies_to(cls, dataset: str) -> bool:
        """Whether it runs on `dataset` (a registered name), known from the adapter's declarations alone."""
        from bench.core.registry import DATASETS

        return not cls.requires or bool(cls.requires & DATASETS.get(dataset).provides)

    @classmethod
    def section(cls) -> str:
        """Its settings' key in `eval` (the name with `_` for `-`)."""
        return cls.name.replace("-", "_")

    @classmethod
    def fractions(cls, cfg: DictConfig) -> list[float]:
        """The label fractions it runs at: its own section's `fractions` where that is set (not null), else
        eval.fractions. (Fine-tuning's default keeps the main job short; see its `defaults`.)"""
        own = cfg.eval.get(cls.section(), {}).get("fractions")
        return [float(f) for f in (cfg.eval.fractions if own is None else own)]

    @classmethod
    def datasets(cls, cfg: DictConfig) -> list[str]:
        """The datasets it runs on: its own section's `datasets` where that is set (not null), else eval.datasets;
        of those, the ones it applies to (`applies_to`)."""
        own = cfg.eval.get(cls.section(), {}).get("datasets")
        return [str(d) for d in (cfg.eval.datasets if own is None else own) if cls.applies_to(str(d))]

    @classmethod
    def jobs(cls, fractions: Sequence[float], seeds: Sequence[int]) -> list[tuple[float, int]]:
        """(label fraction, evaluation seed) of every record it makes for one model and dataset, given the
        configured label fractions and evaluation seeds. A protocol that fits no labels draws nothing, so it is
        one record whatever eval.seeds holds and however the seeds are split over processes, and that record's
        eval seed is always 0."""
        if not cls.fits_labels:
            return [(1.0, 0)]
        return [(float(f), int(s)) for f in fractions for s in seeds]

    @classmethod
    def run(cls, ctx: EvalContext, fraction: float, seed: int, folder: Path) -> ProtocolResult:
        """One evaluation. `folder` is this record's own folder, for a protocol that keeps state (fine-tuning
        resumes from its checkpoint there); it is created only by a protocol that writes to it."""
        raise NotImplementedError

    @classmethod
    def remove_outputs(cls, cfg: DictConfig, folder: Path) -> None:
        """After the record is written: remove what `run` left in `folder` that its settings do not keep."""


def reads_reports(protocol: str, dataset: str) -> bool:
    """Whether `protocol` reads `dataset`'s reports (retrieval on a dataset that has them): its manifest is then
    loaded with them."""
    from bench.core.registry import DATASETS, PROTOCOLS

    return "reports" in PROTOCOLS.get(protocol).requires and "reports" in DATASETS.get(dataset).provides


def evaluated_datasets(cfg: DictConfig) -> list[str]:
    """Every dataset some configured protocol runs on, eval.datasets first, in order."""
    from bench.core.registry import PROTOCOLS

    named = [*cfg.eval.datasets, *(d for p in cfg.eval.protocols for d in PROTOCOLS.get(p).datasets(cfg))]
    return [str(d) for d in dict.fromkeys(named)]


def dataset_list(key: str, v: Any) -> str | None:
    """A protocol's own `datasets`: null (eval.datasets) or distinct registered dataset names."""
    from bench.core.checks import list_of, one_of
    from bench.core.registry import DATASETS

    return None if v is None else list_of(one_of(DATASETS.names()), nonempty=True, distinct=True)(key, v)


def run_protocol(ctx: EvalContext, protocol: str, fraction: float, seed: int, folder: Path) -> ProtocolResult:
    """One evaluation of `ctx.method`, in eval mode whatever mode it came in (and is left in): what a protocol
    computes must not depend on whether its features were cached, which is where eval mode used to be set."""
    from bench.core.registry import PROTOCOLS

    chosen = PROTOCOLS.get(protocol)
    was_training = ctx.method.training
    ctx.method.eval()
    try:
        return chosen.run(ctx, fraction, seed, folder)
    finally:
        ctx.method.train(was_training)
