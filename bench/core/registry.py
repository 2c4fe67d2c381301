"""The three kinds of plug-in, each found the same way: a method (`methods/`), a dataset adapter (`datasets/`)
and an evaluation protocol (`bench/evaluation/protocols/`). A built-in plug-in is a module of its package
that registers its class with a decorator (`@register_method("clip")`, `@register_adapter`,
`@register_protocol`); every module of the package is imported when the kind is first listed. A third
party's plug-in is a module named by an entry point of the kind's group, e.g.

    [project.entry-points."medvlp_bench.methods"]
    mymethod = "mypackage.mymethod"        # a module that calls @register_method("mymethod")

A third-party method also stores its Hydra config in the ConfigStore (group "method", and its ablations
in group "ablation/<name>"), so `bench run --method mymethod` composes like a built-in one. Datasets and
protocols bring their settings in their class (`defaults`), which composition places in the config.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from bench.core.errors import UserError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class of one kind of plug-in, in the order they registered (built-in modules alphabetically,
    then entry points); `sort_key` orders the listing instead where the kind has a natural order."""

    def __init__(self, kind: str, package: str, group: str, sort_key: Callable[[T], object] | None = None,
                 listed: Callable[[], set[str]] | None = None):
        self.kind, self.package, self.group = kind, package, group
        self._sort_key, self._listed = sort_key, listed
        self._classes: dict[str, T] = {}
        self._builtins_loaded = self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """A class decorator: the class is this kind's plug-in `name` (and gets `name` as an attribute)."""

        def decorate(cls: T) -> T:
            existing = self._classes.get(name)
            # re-importing the same module (importlib test modes) registers an equal class again: allowed
            if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({existing.__module__}, {cls.__module__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def unregister(self, name: str) -> None:
        """Forget `name` (a test's toy plug-in, so that it does not leak into the next test)."""
        self._classes.pop(name, None)

    def load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not take the harness down
                raise UserError(f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc

    def load(self) -> None:
        """Import every built-in module of the package and every entry-point plugin, once."""
        if not self._builtins_loaded:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._builtins_loaded = True
        self.load_entry_points()

    def names(self) -> list[str]:
        """Every registered name; where the kind can list its built-in plug-ins without importing them
        (methods: their config files), it does, so that naming them stays instant."""
        if self._listed is not None:
            self.load_entry_points()
            return sorted(self._listed() | set(self._classes))
        return [cls.name for cls in self.classes()]

    def classes(self) -> list[T]:
        self.load()
        found = list(self._classes.values())
        return sorted(found, key=self._sort_key) if self._sort_key else found

    def get(self, name: str) -> T:
        self.load()
        if name not in self._classes:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._classes[name]

    def __iter__(self) -> Iterator[T]:
        return iter(self.classes())


def _method_config_names() -> set[str]:
    import bench.configs

    return {p.stem for p in (Path(bench.configs.__file__).resolve().parent / "method").glob("*.yaml")}


METHODS: Registry = Registry("method", "bench.methods", "medvlp_bench.methods", listed=_method_config_names)
DATASETS: Registry = Registry("dataset", "bench.datasets", "medvlp_bench.datasets", sort_key=lambda cls: cls.name)
PROTOCOLS: Registry = Registry("protocol", "bench.evaluation.protocols", "medvlp_bench.protocols",
                               sort_key=lambda cls: (cls.order, cls.name))

register_method = METHODS.register
register_protocol = PROTOCOLS.register


def register_adapter(cls: T) -> T:
    """A class decorator for a dataset adapter, registered under its `name`."""
    return DATASETS.register(cls.name)(cls)
