"""Config composition: Hydra's compose API under our own CLI, over configs/ and the settings the plug-ins
declare (a dataset adapter's `data.<name>`, a protocol's `eval.<section>`), checked before any work."""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import bench.configs
from bench.core.errors import UserError
from bench.core.registry import DATASETS, PROTOCOLS
from bench.experiment.config_checks import check_config, check_known, override_keys, plain_config

# configs/ ships inside the package as bench.configs (an editable install maps it to the checkout's configs/)
CONFIG_DIR = Path(bench.configs.__file__).resolve().parent

NO_ABLATION = "none"
CONFIG_GROUPS = ("method", "model", "data", "trainer", "eval")  # `model=base` chooses a file, not a value


def plugin_settings() -> dict[str, dict]:
    """The settings the plug-ins declare, as the config files place them: every dataset's `data.<name>` (root
    null, then its adapter's `defaults`) and every protocol's `eval.<section>`."""
    datasets = {cls.name: {"root": None, **cls.defaults} for cls in DATASETS.classes() if not cls.is_variant()}
    protocols = {cls.section(): dict(cls.defaults) for cls in PROTOCOLS.classes() if cls.defaults}
    return {"data": datasets, "eval": protocols}


def _hydra():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    store, declared = ConfigStore.instance(), plugin_settings()
    # a group of their own, not an option of `data` or `eval`: configs/data/default.yaml and
    # configs/eval/default.yaml place them with `/plugins/<name>@_here_`
    store.store(group="plugins", name="datasets", node=declared["data"])
    store.store(group="plugins", name="protocols", node=declared["eval"])
    return compose, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")


def group_options(group: str) -> list[str]:
    """Options of a config group, including ones third-party plugins put in Hydra's ConfigStore."""
    from hydra.core.global_hydra import GlobalHydra

    _, ctx = _hydra()
    with ctx:
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def ablation_names(method: str) -> list[str]:
    return [NO_ABLATION, *group_options(f"ablation/{method}")]


def ablation_catalogue(methods: Iterable[str], changes: bool = False
                       ) -> dict[str, tuple[list[str], dict[str, str], dict[str, dict[str, tuple[Any, Any]]]]]:
    """method -> (its named ablations, its one-switch ablations: prefix -> key, and with `changes` what each named
    ablation changes), read in one Hydra session. The changes come from each ablation file merged onto the
    method's own file (`bench list` answers at once); `ablation_changes` composes the whole configuration and
    is what records store: the two differ only for a key outside `method`, shown here as added."""
    from hydra.core.global_hydra import GlobalHydra

    compose, ctx = _hydra()
    out = {}
    with ctx:
        loader = GlobalHydra.instance().config_loader()
        for method in methods:
            cfg = compose(config_name=f"method/{method}")  # the method's own file: a fraction of the whole config
            params = {k: v for k, v in (cfg.method.get("ablation_parameters") or {}).items() if v}
            named = sorted(loader.get_group_options(f"ablation/{method}"))
            table: dict[str, dict[str, tuple[Any, Any]]] = {}
            if changes:
                base = flatten_config(cfg)
                for ablation in named:
                    path = CONFIG_DIR / "ablation" / method / f"{ablation}.yaml"
                    # a plug-in's ablation lives on its own search path: composed whole, below
                    table[ablation] = _differences(base, flatten_config(OmegaConf.merge(
                        cfg, OmegaConf.load(path)))) if path.is_file() else None
            out[method] = [NO_ABLATION, *named], params, table
    for method, (_, _, table) in out.items():
        elsewhere = [a for a, found in table.items() if found is None]
        table.update(ablation_change_table(method, elsewhere) if elsewhere else {})
    return out


def compose_config(method: str, ablation: str = NO_ABLATION, seed: int | None = None,
                   overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the primary config with a method, one of its ablations and user overrides."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.core.registry import METHODS

    methods = METHODS.names()
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
            raise UserError(f"malformed override {item!r}: expected key=value "
                            f"(e.g. trainer.budget.epochs=2 or model=tiny)")
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


ABSENT = "<absent>"  # the value, in `ablation_changes`, of a key that one side of the comparison does not have


def ablation_changes(method: str, ablation: str, overrides: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """What an ablation changes: the resolved configuration of `method` composed with and without it (and with
    `overrides` on both sides), compared key by key: {dotted key: (value without, value with)}, ABSENT for a
    key only one side has; lists compare whole. What a record stores beside the ablation's name."""
    return ablation_change_table(method, [ablation], overrides)[ablation]


def ablation_change_table(method: str, ablations: Iterable[str], overrides: Iterable[str] = ()
                          ) -> dict[str, dict[str, tuple[Any, Any]]]:
    """`ablation_changes` of several ablations of one method, composed in one Hydra session."""
    from bench.core.registry import METHODS

    if method not in METHODS.names():
        raise UserError(f"unknown method {method!r}; valid methods: {', '.join(METHODS.names())}")
    ablations, overrides = list(ablations), list(overrides)
    if not ablations:
        return {}
    named = ablation_names(method)
    items = {a: [] if a == NO_ABLATION else [f"+ablation/{method}={a}"] if a in named else
             [_parametric_ablation(method, a, named)] for a in ablations}
    compose, ctx = _hydra()
    out = {}
    with ctx:
        def flat(extra: list[str]) -> dict[str, Any]:
            return flatten_config(compose(config_name="config", overrides=[f"method={method}", *extra, *overrides]))

        base = flat([])
        for ablation, extra in items.items():
            out[ablation] = _differences(base, flat(extra))
    return out


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """{dotted key: value} of a resolved configuration, lists whole (as `ablation_changes` compares them)."""
    return _flatten(plain_config(cfg))


def _differences(base: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (base value, new value)} of the keys whose values differ, ABSENT where one side lacks the key."""
    return {k: (base.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(base.keys() | new.keys())
            if base.get(k, ABSENT) != new.get(k, ABSENT)}


def ablation_note(method: str, ablation: str) -> str | None:
    """The `# follows: ...` line of an ablation's file: what else changes, necessarily, with what its name says
    (None: nothing, or no file, as for NAME-VALUE ablations)."""
    path = CONFIG_DIR / "ablation" / method / f"{ablation}.yaml"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("# follows:"):
            return line[len("# follows:"):].strip()
    return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


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
