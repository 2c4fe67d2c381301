"""Config composition (Hydra's compose API under our own CLI) and the hashes that identify experiments."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

import bench.configs
from bench.core.errors import UserError
from bench.experiment.config_checks import (
    check_config,
    check_known,
    override_keys,
    plain_config,
)

# configs/ ships inside the package as bench.configs (an editable install maps it to the checkout's configs/)
CONFIG_DIR = Path(bench.configs.__file__).resolve().parent

NO_ABLATION = "none"
CONFIG_GROUPS = ("method", "model", "data", "trainer", "eval")  # `model=base` chooses a file, not a value
# keys that say how a run executes or where it writes, not what it computes
NON_SEMANTIC = ("runtime", "results_dir")


def _hydra():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    return compose, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")


def group_options(group: str) -> list[str]:
    """Options of a config group, including ones third-party plugins put in Hydra's ConfigStore."""
    from hydra.core.global_hydra import GlobalHydra

    _, ctx = _hydra()
    with ctx:
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def ablation_names(method: str) -> list[str]:
    return [NO_ABLATION, *group_options(f"ablation/{method}")]


def ablation_catalogue(methods: Iterable[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """method -> (its named ablations, its one-switch ablations: prefix -> key), read in one Hydra session."""
    from hydra.core.global_hydra import GlobalHydra

    compose, ctx = _hydra()
    out = {}
    with ctx:
        loader = GlobalHydra.instance().config_loader()
        for method in methods:
            cfg = compose(config_name=f"method/{method}")  # the method's own file: a fraction of the whole config
            params = {k: v for k, v in (cfg.method.get("ablation_parameters") or {}).items() if v}
            out[method] = [NO_ABLATION, *sorted(loader.get_group_options(f"ablation/{method}"))], params
    return out


def compose_config(method: str, ablation: str = NO_ABLATION, seed: int | None = None,
                   overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the primary config with a method, one of its ablations and user overrides."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.core.registry import method_names

    methods = method_names()
    if method not in methods:
        raise UserError(f"unknown method {method!r}; valid methods: {', '.join(methods)}")
    items = [f"method={method}"]
    ablations = ablation_names(method)
    if ablation in ablations:
        if ablation != NO_ABLATION:
            items.append(f"+ablation/{method}={ablation}")
    else:
        items.append(_parametric_ablation(method, ablation, ablations))
    if seed is not None:
        items.append(f"seed={seed}")
    user = list(overrides)
    for item in user:
        if "=" not in item or not item.split("=", 1)[0].lstrip("+~"):
            raise UserError(f"malformed override {item!r}: expected key=value (e.g. trainer.epochs=2 or model=tiny)")
    compose, ctx = _hydra()
    # the same config without the user's values (but with their choice of presets): what types are checked by
    groups = [item for item, key in zip(user, override_keys(user)) if key in CONFIG_GROUPS]
    try:
        with ctx:
            defaults = compose(config_name="config", overrides=items + groups)
            check_known(override_keys(user), plain_config(defaults))
            cfg = compose(config_name="config", overrides=items + user)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        text = str(exc).strip() or str(exc.__cause__ or type(exc).__name__).strip()
        lines = [line.strip() for line in text.splitlines()[:2]]
        raise UserError(f"bad override: {' '.join(lines)}{_valid_options_hint(lines[0])}") from None
    # recorded; set here because `ablation=` on Hydra's line means the group
    cfg.ablation = defaults.ablation = ablation
    if cfg.method.name != method:
        raise UserError(f"configs/method/{method}.yaml must set name: {method} (it says {cfg.method.name!r})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"required setting(s) not given: {', '.join(missing)} (add e.g. {missing[0]}=/path)")
    check_config(cfg, defaults)
    return cfg


def ablation_parameters(method: str) -> dict[str, str]:
    """The method's one-switch ablations: `NAME-VALUE` sets `method.<key>` to VALUE (its config's
    `ablation_parameters`, e.g. attmim-share -> image_masking.attention_share)."""
    return ablation_catalogue([method])[method][1]


def _parametric_ablation(method: str, ablation: str, named: list[str]) -> str:
    """The override an ablation like `attmim-share-0.5` stands for."""
    params = ablation_parameters(method)
    for prefix in sorted(params, key=len, reverse=True):
        value = ablation[len(prefix) + 1:] if ablation.startswith(prefix + "-") else ""
        try:
            float(value)
        except ValueError:
            continue
        return f"method.{params[prefix]}={value}"
    patterns = [f"{p}-<number>" for p in params]
    raise UserError(f"unknown ablation {ablation!r} for method {method!r}; valid ablations: "
                    f"{', '.join(named + patterns)}")


def _valid_options_hint(message: str) -> str:
    """For 'Could not find 'model/xyz'' errors, list what the group offers."""
    m = re.search(r"Could not find '([\w/.-]+)/[^/']+'", message)
    if not m:
        return ""
    try:
        return f"; valid {m.group(1)} options: {', '.join(group_options(m.group(1)))}"
    except Exception:  # the hint is a courtesy; the error stands without it
        return ""


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def stable_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(cfg: DictConfig) -> str:
    """Everything that decides the numbers, seeds included."""
    plain = to_plain(cfg)
    return stable_hash({k: v for k, v in plain.items() if k not in NON_SEMANTIC})


def dataset_settings(cfg: DictConfig, name: str) -> DictConfig:
    """`data.<name>`, or the entry a dataset variant shares (chexpert-5x200 reads `data.chexpert`)."""
    from bench.datasets import get_adapter

    key = get_adapter(name).config_key or name
    if key not in cfg.data:
        raise UserError(f"dataset {name!r} has no settings: data.{key} is missing from the config")
    return cfg.data[key]


def dataset_identity(cfg: DictConfig, name: str) -> dict:
    """What decides a dataset's samples: its settings, the corrupt-image policy, and, when it reads the
    synthetic copy (root null), the generator's parameters. Cache and split folders are left out."""
    from bench.data.synth import DATASETS, GENERATOR_VERSION
    from bench.datasets import get_adapter

    settings = to_plain(dataset_settings(cfg, name))
    out = {"dataset": name, "settings": settings, "corrupt_images": cfg.data.corrupt_images}
    if settings.get("root") is None:
        size = cfg.data.synthetic.size
        counts = DATASETS.get(get_adapter(name).config_key or name, ("", {}))[1]
        out["synthetic"] = {"size": size, "seed": cfg.data.synthetic.seed, "generator_version": GENERATOR_VERSION,
                            "count": counts.get(size)}
    return out


def corpus_sources(cfg: DictConfig) -> dict[str, list[str]]:
    """The pretraining sources this method reads, by kind: always the paired ones; the image-only and
    text-only ones only for a method with `unpaired: true`."""
    corpus = cfg.data.corpus
    sources = {"paired": list(corpus.paired)}
    if not sources["paired"]:
        raise UserError("data.corpus.paired is empty: pretraining needs at least one paired image-report source")
    if cfg.method.get("unpaired", False):
        sources.update(image_only=list(corpus.image_only), text_only=list(corpus.text_only))
    return sources


def pretrain_hash(cfg: DictConfig) -> str:
    """What decides a pretrained checkpoint except its seed: runs that differ only in seed share it, and
    tables aggregate seeds within it. Of `data`, only the corpus sources the method reads count."""
    plain = to_plain(cfg)
    kept = {k: v for k, v in plain.items() if k not in (*NON_SEMANTIC, "seed", "eval", "data")}
    sources = corpus_sources(cfg)
    data = {kind: [dataset_identity(cfg, name) for name in names] for kind, names in sources.items()}
    if len(sources) > 1:
        data["mix"] = to_plain(cfg.data.corpus.mix)
    return stable_hash({**kept, "data": data})


# eval settings that choose which records to make, or how fast, not what any one record holds
EVAL_SCHEDULE = ("datasets", "protocols", "fractions", "seeds", "random_init_baseline", "cache_features",
                 "batch_size")


def eval_hash(cfg: DictConfig, protocol: str, dataset: str) -> str:
    """The settings of one evaluation (its protocol's section of `eval`, the shared ones, the dataset's)."""
    e = to_plain(cfg.eval)
    protocol_sections = {"zero_shot", "linear_probe", "fine_tune"}
    shared = {k: v for k, v in e.items() if k not in EVAL_SCHEDULE and k not in protocol_sections}
    return stable_hash({"protocol": protocol, "shared": shared, "own": e.get(protocol.replace("-", "_"), {}),
                        "data": dataset_identity(cfg, dataset)})
