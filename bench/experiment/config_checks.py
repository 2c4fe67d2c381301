"""The one check every configuration passes before any work starts, whichever command composed it (`run`,
`eval`, `suite`, `sweep`, `profile`, `mask`).

Three kinds of check, so that a bad value is one line naming the key and what is valid, never a traceback
after an hour of pretraining:
- **unknown keys**: an override must name a setting the configuration has (a `+key=value` that nothing reads
  would only change the hashes); the few open mappings (`OPEN`) take any key.
- **types**: every value must have the type of the same setting in the configuration as composed without
  the user's values (the method's, ablation's and presets' files), so `trainer.budget.epochs=abc` or
  `eval.seeds=[x]` is refused whatever the key. An integer is accepted where a number is expected.
- **ranges and names**: `RULES` (and `PATTERNS` for every dataset's settings) say which values are valid
  where the type does not, e.g. batch sizes >= 1, label fractions in (0, 1], registered datasets and
  protocols, and where `null` is allowed. Plug-ins declare their own: a dataset adapter's `setting_checks`
  for `data.<name>.*`, a protocol's for `eval.<section>.*` (zero-shot's prompt sets, for one), a method's
  for `method.*`, and its `check_config` for switches that are valid one by one but not together.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from bench.core.checks import (Check, folder_or_null, integer, is_int, is_number, list_of, number, number_or_numbers,
                               one_of, show, switch, text)
from bench.core.errors import UserError
from bench.core.progress import SETTINGS as PROGRESS
from bench.evaluation.protocol import evaluated_datasets
from bench.data.synth import DIFFICULTIES, SIZES
from bench.train.loggers import check_loggers

# mappings whose keys are the user's to choose: Hugging Face config fields, label phrases, label files
OPEN = ("model.text.config", "method.prompts.names", "data.covidx.label_files")


def _datasets() -> list[str]:
    from bench.core.registry import DATASETS

    return DATASETS.names()


def _protocols() -> list[str]:
    from bench.core.registry import PROTOCOLS

    return PROTOCOLS.names()


DATASETS = one_of(_datasets)

RULES: dict[str, Check] = {
    "seed": integer(0),
    "results_dir": text(),
    "trainer.budget.epochs": integer(1),
    "trainer.budget.steps": integer(1, null=True),
    "trainer.batch_size": integer(1),
    "trainer.lr": number(0, low_open=True),
    "trainer.weight_decay": number(0),
    "trainer.betas": list_of(number(0, 1, high_open=True), length=2),
    "trainer.warmup_steps": integer(0),
    "trainer.min_lr_ratio": number(0, 1),
    "trainer.accumulate": integer(1),
    "trainer.grad_clip": number(0, low_open=True, null=True),
    "trainer.precision": one_of(("auto", "bf16", "fp32")),
    "trainer.checkpoint_every": integer(1),
    "eval.datasets": list_of(DATASETS, distinct=True),
    "eval.protocols": list_of(one_of(_protocols), distinct=True),
    "eval.fractions": list_of(number(0, 1, low_open=True), distinct=True),
    "eval.seeds": list_of(integer(0), distinct=True),
    "eval.fraction_subsets": one_of(("fixed", "per-seed")),
    "eval.batch_size": integer(1),
    "eval.bootstrap.resamples": integer(1),
    "eval.bootstrap.seed": integer(0),
    "eval.bootstrap.confidence": number(0, 1, low_open=True, high_open=True),
    "data.corpus.paired": list_of(DATASETS, nonempty=True, distinct=True),
    "data.corpus.image_only": list_of(DATASETS, distinct=True),
    "data.corpus.text_only": list_of(DATASETS, distinct=True),
    "data.corpus.mix.image_only": number(0),
    "data.corpus.mix.text_only": number(0),
    "data.synthetic.size": one_of(SIZES),
    "data.synthetic.seed": integer(0),
    "data.synthetic.difficulty": one_of(DIFFICULTIES),
    "data.synthetic.root": text(),
    "data.splits_dir": text(),
    "data.cache_dir": text(null=True),
    "data.corrupt_images": one_of(("skip", "error")),
    "model.embed_dim": integer(1),
    "model.image.image_size": integer(1),
    "model.image.patch_size": integer(1),
    "model.image.stem": one_of(("patch", "conv")),
    "model.text.max_length": integer(1),
    "model.image.open_clip_name": text(null=True),  # null: built from the preset's fields
    "model.image.pretrained": text(null=True),
    "model.text.pretrained": text(null=True),  # null: a random BERT from model.text.config
    "model.image.mean": number_or_numbers,
    "model.image.std": number_or_numbers,
    "runtime.device": lambda k, v: None if isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or (
        v.startswith("cuda:") and v[5:].isdigit())) else "auto, cpu, cuda, cuda:N or mps",
    "runtime.num_workers": lambda k, v: None if v == "auto" or (is_int(v) and v >= 0) else "an integer >= 0 or auto",
    "runtime.decode_workers": integer(1, null=True),
    "runtime.threads": integer(1, null=True),
    "runtime.loggers": check_loggers,
    # true and false, its values before it had modes, still mean auto and quiet
    "runtime.progress": lambda k, v: None if isinstance(v, bool) or v in PROGRESS else
    "auto, bar, lines, quiet, true (auto) or false (quiet)",
    "runtime.speed.compile": switch,
    "runtime.speed.tf32": switch,
    "runtime.speed.channels_last": switch,
    "runtime.speed.fused_optimizer": switch,
    "runtime.speed.grad_checkpointing": switch,
    "runtime.speed.pin_memory": switch,
    "runtime.speed.attention": one_of(("fused", "math")),
}
# every dataset's entry in `data` (data.<name>.<setting>), for the settings datasets share
PATTERNS: dict[str, Check] = {
    "data.*.*_fraction": number(0, 1, high_open=True),
}


def _rule(key: str, own: dict[str, Check]) -> Check | None:
    if key in RULES or key in own:
        return RULES.get(key) or own[key]
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "data":  # a dataset's own settings, as its adapter declares them
        declared = _adapter_settings().get(parts[1], {}).get(parts[2])
        if declared is not None:
            return declared
    if len(parts) == 3 and parts[0] == "eval":  # a protocol's own settings, as it declares them
        declared = _protocol_settings().get(parts[1], {}).get(parts[2])
        if declared is not None:
            return declared
    return next((check for pattern, check in PATTERNS.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _adapter_settings() -> dict[str, dict[str, Check]]:
    """data.<key> -> the setting checks its adapters declare (a variant such as chexpert-5x200 adds to its
    entry's)."""
    from bench.core.registry import DATASETS

    out: dict[str, dict[str, Check]] = {}
    for cls in DATASETS.classes():
        out.setdefault(cls.settings_key(), {}).update(cls.setting_checks)
    return out


def _protocol_settings() -> dict[str, dict[str, Check]]:
    """eval.<section> -> the setting checks its protocol declares."""
    from bench.core.registry import PROTOCOLS

    return {cls.section(): cls.setting_checks for cls in PROTOCOLS.classes()}


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "true or false"
    if is_int(v):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a text"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if is_int(default):
        return is_int(value)
    if isinstance(default, float):
        return is_number(value)
    return isinstance(value, type(default))


def _walk(key: str, value: Any, default: Any, open_: bool, own: dict[str, Check]) -> None:
    rule = _rule(key, own)
    if rule is not None:
        problem = rule(key, value)
        if problem:
            raise UserError(f"{key}={show(value)} is not valid: expected {problem}")
        return
    if default is None or open_:  # nothing to compare with (null by default), or a mapping of the user's
        return
    if value is None or not _same_type(value, default):
        raise UserError(f"{key}={show(value)} is not valid: expected {_type_name(default)} (its default is "
                        f"{show(default)})")
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            _walk(sub, v, default.get(k), sub in OPEN or key in OPEN, own)
    elif isinstance(value, list) and default:
        for i, v in enumerate(value):
            if not _same_type(v, default[0]):
                raise UserError(f"{key}[{i}]={show(v)} is not valid: expected {_type_name(default[0])} in the "
                                f"list")


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The setting each key=value override names (Hydra's + and ~ prefixes removed)."""
    return [item.split("=", 1)[0].lstrip("+~") for item in overrides]


def _has(plain: dict, key: str) -> bool:
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_known(keys: Iterable[str], defaults: dict) -> None:
    """Every key names a setting of `defaults` (or lies in an open mapping)."""
    for key in keys:
        if "/" in key or _has(defaults, key) or any(key.startswith(f"{o}.") for o in OPEN):
            continue
        parent, _, leaf = key.rpartition(".")
        siblings = sorted(_node(defaults, parent)) if parent and isinstance(_node(defaults, parent), dict) else \
            sorted(defaults)
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        where = f"{parent} has" if parent and isinstance(_node(defaults, parent), dict) else "valid keys are"
        raise UserError(f"unknown setting {key}{hint} ({where} {', '.join(map(str, siblings))})")


def _node(plain: dict, key: str) -> Any:
    node: Any = plain
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def plain_config(cfg: DictConfig) -> dict:
    """The configuration as plain data with its interpolations resolved (a broken one is a one-line error)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"bad setting: {str(exc).strip().splitlines()[0]}") from None


def check_config(cfg: DictConfig, defaults: DictConfig, reads_corpus: bool = True) -> None:
    """Refuse `cfg` (composed from `defaults` and the user's values) if any value has the wrong type or lies
    outside its range, or a dataset it reads has no root (the pretraining corpus's only if `reads_corpus`:
    evaluating a checkpoint reads none of it); see the module docstring. (`check_known` checks the overrides'
    keys first.)"""
    from bench.core.registry import DATASETS, METHODS, PROTOCOLS
    from bench.data.loading import dataset_settings
    from bench.experiment.identity import corpus_sources

    plain, base = plain_config(cfg), plain_config(defaults)
    method = METHODS.get(plain["method"]["name"])
    _walk("", plain, base, False, {f"method.{k}": check for k, check in method.setting_checks.items()})
    method.check_config(cfg)
    e = plain["eval"]
    fitting = [p for p in e["protocols"] if PROTOCOLS.get(p).fits_labels]
    if fitting and not e["seeds"]:
        raise UserError(f"eval.seeds is empty, but eval.protocols has {', '.join(fitting)}: give at least one, "
                        f"e.g. eval.seeds=[0]")
    for name in fitting:
        if not PROTOCOLS.get(name).fractions(cfg):
            raise UserError(f"eval.fractions is empty, and {name} has no fractions of its own: give at least one, "
                            f"e.g. eval.fractions=[1.0]")
    evaluated = evaluated_datasets(cfg)
    read = {*evaluated, *(n for names in corpus_sources(cfg).values() for n in names)} if reads_corpus else set(evaluated)
    for name in sorted(read):
        settings = dataset_settings(cfg, name)  # every dataset read has its entry in `data`
        folder_or_null(f"data.{DATASETS.get(name).settings_key()}.root", settings.get("root"))
    for key, entry in plain["data"].items():
        held_out = [entry[k] for k in ("val_fraction", "test_fraction") if isinstance(entry, dict) and k in entry]
        if len(held_out) == 2 and sum(held_out) >= 1:
            raise UserError(f"data.{key}.val_fraction + data.{key}.test_fraction = {sum(held_out):g}: they must sum "
                            f"below 1, or nothing is left to train on")
