"""Finding plugins: entry points -> pluggy -> a catalog of named plugin objects.

Every plugin, built-in or third-party, is a module listed in the ``cifarx`` entry-point group.
Loading is guarded: a package that fails to import, or whose hook raises, becomes one line in
``problems`` and everything else keeps working. ``CIFARX_LOAD_PLUGINS=a,b`` limits the
third-party packages that load; the built-ins always load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import UserError
from .plugin_types import KINDS, Family

GROUP = "cifarx"
BUILTIN_PACKAGE = "cifarx"
ALLOW_ENV = "CIFARX_LOAD_PLUGINS"


def _canonical(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


@dataclass(frozen=True)
class Entry:
    """One registered name: which kind, which package registered it, and the object itself."""

    kind: str
    name: str
    package: str
    version: str
    summary: str
    item: Any  # the plugin object (Architecture, ...) or a Family

    @property
    def builtin(self) -> bool:
        return _canonical(self.package) == BUILTIN_PACKAGE


class Catalog:
    """Everything the loaded plugins registered, looked up by kind and name."""

    def __init__(self, entries: list[Entry], problems: list[str]):
        self.entries = entries
        self.problems = problems

    def names(self, kind: str) -> list[str]:
        return sorted({e.name for e in self.entries if e.kind == kind})

    def clashes(self) -> dict[tuple[str, str], list[Entry]]:
        """Names that more than one registration claims, keyed by (kind, name)."""
        by_key: dict[tuple[str, str], list[Entry]] = {}
        for e in self.entries:
            by_key.setdefault((e.kind, e.name), []).append(e)
        return {key: found for key, found in by_key.items() if len(found) > 1}

    def get(self, kind: str, name: str) -> Any:
        """The plugin object of this kind called ``name``, or a UserError saying what exists."""
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}")
        exact = [e for e in self.entries if e.kind == kind and e.name == name]
        families = [e for e in self.entries if e.kind == kind and isinstance(e.item, Family)
                    and name.startswith(e.item.prefix) and len(name) > len(e.item.prefix)]
        found = exact or families
        if not found:
            available = ", ".join(self.names(kind)) or "none installed"
            raise UserError(f"unknown {kind} {name!r}; available: {available}")
        if len(found) > 1:
            owners = " and ".join(f"{e.package} {e.version}".strip() for e in found)
            raise UserError(f"{kind} {name!r} is registered by more than one package ({owners}); "
                            f"uninstall one, or choose with {ALLOW_ENV}=<package>")
        item = found[0].item
        if isinstance(item, Family):
            item = item.resolve(name[len(item.prefix):])
            expected = KINDS[kind][1]
            if not isinstance(item, expected):
                raise TypeError(f"{found[0].package}: family {found[0].name!r} resolved {name!r} to "
                                f"{type(item).__name__}, not {expected.__name__}")
            if item.name != name:
                item = dataclasses.replace(item, name=name)
        return item


class Registry:
    """A pluggy PluginManager plus where each plugin came from."""

    def __init__(self):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)
        self.load_problems: list[str] = []

    def register(self, plugin: object, name: str, package: str | None = None, version: str = ""):
        """Register a plugin object (a module, a class instance) under ``name``."""
        self.pm.register(plugin, name=name)
        self.origins[name] = (package or name, version)

    def unregister(self, name: str):
        self.pm.unregister(name=name)
        self.origins.pop(name, None)

    def load_entry_points(self, allow: set[str] | None = None):
        """Load the ``cifarx`` entry points; ``allow`` limits the third-party packages."""
        seen_packages = set()
        for ep in importlib.metadata.entry_points(group=GROUP):
            package = ep.dist.name if ep.dist else ep.module
            version = ep.dist.version if ep.dist else ""
            builtin = _canonical(package) == BUILTIN_PACKAGE
            seen_packages.add(_canonical(package))
            if not builtin and allow is not None and _canonical(package) not in allow:
                continue
            name = f"{package}:{ep.name}"
            if self.pm.has_plugin(name):  # the same distribution found twice on sys.path
                continue
            try:
                self.register(ep.load(), name=name, package=package, version=version)
            except Exception as exc:  # a broken package must not take the others down
                self.load_problems.append(
                    f"plugin package {package} ({ep.value}) failed to load: "
                    f"{type(exc).__name__}: {exc}")
        for missing in sorted((allow or set()) - seen_packages):
            self.load_problems.append(f"{ALLOW_ENV} names {missing!r}, which is not installed")

    def catalog(self) -> Catalog:
        """Call every plugin's register hooks, each guarded, and collect what they register."""
        entries: list[Entry] = []
        problems = list(self.load_problems)
        for kind, (hook_name, cls) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                package, version = self.origins.get(impl.plugin_name, (impl.plugin_name, ""))
                added: list[Entry] = []

                def register(item, kind=kind, cls=cls, package=package, version=version, added=added):
                    if isinstance(item, Family):
                        name = item.prefix + "*"
                    elif isinstance(item, cls):
                        name = item.name
                    else:
                        raise TypeError(f"{hook_name} got {type(item).__name__}; "
                                        f"expected {cls.__name__} or Family")
                    added.append(Entry(kind, name, package, version, item.summary, item))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    problems.append(f"plugin package {package}: {hook_name} failed: "
                                    f"{type(exc).__name__}: {exc}")
                    continue
                entries.extend(added)
        return Catalog(entries, problems)


_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        allow_env = os.environ.get(ALLOW_ENV)
        allow = None
        if allow_env is not None:
            allow = {_canonical(p) for p in allow_env.split(",") if p.strip()}
        _registry = Registry()
        _registry.load_entry_points(allow)
    return _registry


def catalog() -> Catalog:
    return registry().catalog()
