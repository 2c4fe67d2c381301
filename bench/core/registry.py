"""Method registry: modules in `bench.methods` register themselves; third parties use an entry point.

    [project.entry-points."medvlp_bench.methods"]
    mymethod = "mypackage.mymethod"        # a module that calls @register_method("mymethod")

A third-party method also stores its Hydra config in the ConfigStore (group "method", and its ablations
in group "ablation/<name>"), so `bench run --method mymethod` composes like a built-in one.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, TypeVar

from bench.core.errors import UserError

ENTRY_POINT_GROUP = "medvlp_bench.methods"

_METHODS: dict[str, type] = {}
_loaded = _entry_points_loaded = False

M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    def decorate(cls: M) -> M:
        existing = _METHODS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is registered twice ({existing.__module__}, {cls.__module__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    """Import every entry-point plugin, once: its method registers itself and its config enters Hydra's
    ConfigStore, which composing a config needs."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not take the harness down
            raise UserError(f"method plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc


def load_plugins() -> None:
    """Import every built-in method module and every entry-point plugin, once."""
    global _loaded
    if _loaded:
        return
    import bench.methods

    for info in pkgutil.iter_modules(bench.methods.__path__):
        importlib.import_module(f"bench.methods.{info.name}")
    _load_entry_points()
    _loaded = True


def method_names() -> list[str]:
    """Every method: the built-in ones by their config files (configs/method/), the third-party ones by
    their plugins. Naming them imports no built-in method module (nor torch), so listing stays instant."""
    import bench.configs

    _load_entry_points()
    configs = Path(bench.configs.__file__).resolve().parent / "method"
    return sorted({p.stem for p in configs.glob("*.yaml")} | set(_METHODS))


def get_method(name: str) -> type:
    load_plugins()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
