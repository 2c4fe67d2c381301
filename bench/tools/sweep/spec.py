"""What a sweep searches and scores: its parameters, its objective and the spec that defines a study."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import stable_hash, to_plain
from bench.core.registry import PROTOCOLS
from bench.evaluation.metrics import METRICS
from bench.experiment.config import compose_config

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
SCALES = ("float", "log", "int")


@dataclass(frozen=True)
class Param:
    """One searched setting: `key` is the full config key `name` resolved to."""

    name: str
    key: str
    low: float | None = None
    high: float | None = None
    scale: str = "float"  # float | log | int, for ranges
    choices: tuple | None = None  # for lists

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.scale == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.scale == "log")


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _leaf_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def resolve_key(name: str, cfg: DictConfig) -> str:
    """A full config key (`method.image_masking.mask_ratio`) or a unique ending of one (`mask_ratio`)."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in ("runtime", "results_dir", "seed", "ablation")}
    keys = _leaf_keys(plain)
    if name in keys:
        return name
    matches = [k for k in keys if k.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"--param {name}: no such setting in the {cfg.method.name} config (give a key such as "
                        f"method.image_masking.mask_ratio or trainer.lr)")
    raise UserError(f"--param {name} is ambiguous: {', '.join(sorted(matches))}; give the full key")


def parse_param(spec: str, cfg: DictConfig) -> Param:
    """`NAME=LOW:HIGH[:log|:int]` or `NAME=a,b,c`."""
    name, sep, values = spec.partition("=")
    if not sep or not name or not values:
        raise UserError(f"--param {spec!r}: expected NAME=LOW:HIGH[:log|:int] or NAME=a,b,c")
    key = resolve_key(name.strip(), cfg)
    if ":" not in values:
        choices = tuple(_value(v) for v in values.split(",") if v.strip())
        if not choices:
            raise UserError(f"--param {spec!r}: no values")
        return Param(name, key, choices=choices)
    parts = values.split(":")
    scale = parts[2] if len(parts) == 3 else "float"
    if len(parts) not in (2, 3) or scale not in SCALES:
        raise UserError(f"--param {spec!r}: a range is LOW:HIGH, LOW:HIGH:log or LOW:HIGH:int")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"--param {spec!r}: LOW and HIGH must be numbers") from None
    if not low < high or (scale == "log" and low <= 0) or (scale == "int" and not (low.is_integer() and high.is_integer())):
        raise UserError(f"--param {spec!r}: need LOW < HIGH (positive for log, whole numbers for int)")
    default = OmegaConf.select(cfg, key)
    if scale != "int" and isinstance(default, int) and not isinstance(default, bool):
        raise UserError(f"--param {spec!r}: {key} is a whole number; search it with {name}={values}:int")
    return Param(name, key, low, high, scale)


def _value(text: str) -> Any:
    """A listed value as the config would read it: 1e-4 is a number (YAML 1.1 reads it as text)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Objective:
    """`[DATASETS:]PROTOCOL:METRIC[:FRACTION]`, maximised: the metric's mean over the datasets' val splits."""

    datasets: tuple[str, ...]
    protocol: str
    metric: str
    fraction: float = 1.0

    @classmethod
    def parse(cls, spec: str, default_datasets: list[str] | Callable[[str], list[str]]) -> "Objective":
        """`default_datasets`: the datasets when the spec names none, or a function of the protocol giving them
        (`Protocol.datasets`: a protocol's own datasets, or those of eval.datasets it applies to)."""
        from bench.core.registry import DATASETS

        parts = spec.split(":")
        protocols = PROTOCOLS.names()
        if len(parts) == 2 or (len(parts) == 3 and parts[0] in protocols):
            named = parts[0] if parts[0] in protocols else None
            defaults = default_datasets(named) if callable(default_datasets) and named else \
                ([] if callable(default_datasets) else default_datasets)
            parts = [",".join(defaults), *parts]
        if len(parts) not in (3, 4):
            raise UserError(f"--objective {spec!r}: expected [DATASETS:]PROTOCOL:METRIC[:FRACTION], e.g. "
                            f"rsna,chexpert:linear-probe:auc")
        datasets = tuple(d for d in parts[0].split(",") if d)
        for d in datasets:
            DATASETS.get(d)
        protocol, metric = parts[1], parts[2]
        if protocol not in protocols:
            raise UserError(f"--objective {spec!r}: unknown protocol {protocol!r}; valid: {', '.join(protocols)}")
        runs = PROTOCOLS.get(protocol)
        if not runs.is_metric(metric):
            valid = sorted({m for names in METRICS.values() for m in names})
            raise UserError(f"--objective {spec!r}: {protocol} has no metric {metric!r}"
                            + (f"; valid: {', '.join(valid)}" if runs.is_metric(valid[0]) else ""))
        wrong = [d for d in datasets if not runs.applies_to(d)]
        if wrong:
            raise UserError(f"--objective {spec!r}: {protocol} needs a dataset that provides "
                            f"{' or '.join(sorted(runs.requires))}; {', '.join(wrong)} does not")
        fraction = float(parts[3]) if len(parts) == 4 else 1.0
        if not 0 < fraction <= 1 or not datasets:
            raise UserError(f"--objective {spec!r}: needs at least one dataset and a fraction in (0, 1]")
        return cls(datasets, protocol, metric, fraction)

    @property
    def text(self) -> str:
        return f"{','.join(self.datasets)}:{self.protocol}:{self.metric}:{self.fraction:g}"


@dataclass
class SweepSpec:
    """Everything that defines a study; stored in it, so a resumed or joined study is the same search."""

    method: str
    ablation: str
    params: list[Param]
    objective: Objective
    seeds: list[int]
    overrides: list[str]
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    sampler_seed: int = 0
    results_dir: str = "results"
    study_name: str | None = None
    storage: str | None = None
    # runtime.progress of every run (--quiet); how runs show progress is no part of the search, so not of `identity`
    progress: str | None = None
    identity: dict = field(init=False)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if not self.params:
            raise UserError("a sweep needs at least one --param NAME=LOW:HIGH or NAME=a,b,c")
        if not self.seeds:
            raise UserError("--seeds is empty: give at least one pretraining seed, e.g. --seeds 0")
        if self.sampler == "grid" and any(p.choices is None for p in self.params):
            raise UserError("--sampler grid needs every --param as a list of values (NAME=a,b,c)")
        self.identity = {"method": self.method, "ablation": self.ablation, "objective": self.objective.text,
                         "seeds": self.seeds, "overrides": self.overrides,
                         "params": [{k: v for k, v in asdict(p).items() if k != "name"} for p in self.params]}
        self.study_name = self.study_name or f"{self.method}-{self.ablation}-{stable_hash(self.identity)[:8]}"
        for p in self.params:  # every value a trial can draw is checked before the first trial runs
            for value in p.choices or ((int(p.low), int(p.high)) if p.scale == "int" else (p.low, p.high)):
                try:
                    self.config(self.seeds[0], {p.key: value})
                except UserError as exc:
                    raise UserError(f"--param {p.name}: {exc}") from None

    @property
    def folder(self) -> Path:
        return Path(self.results_dir).expanduser() / "sweeps" / self.study_name

    def config(self, seed: int, values: dict[str, Any] | None = None, *, ablation: str | None = None,
               extra: list[str] = ()) -> DictConfig:
        """The run config of a trial (its parameter values), or of the final runs."""
        overrides = [*self.overrides, *(f"{k}={override_value(v)}" for k, v in (values or {}).items()), *extra,
                     f"results_dir={self.results_dir}"]
        if self.progress:
            overrides.append(f"runtime.progress={self.progress}")
        cfg = compose_config(self.method, self.ablation, seed, overrides)
        if ablation is not None:
            cfg.ablation = ablation
        return cfg


def override_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)
