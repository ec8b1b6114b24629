"""Finding plugins: entry points -> pluggy -> a catalog of named plugin objects.

Every plugin, built-in or third-party, is a module listed in the ``cifarx`` entry-point group.
Loading is guarded: a package that fails to import, whose hook raises, or that implements a hook
no hookspec declares (a misspelling), becomes one line in ``problems`` and everything else keeps
working. ``CIFARX_LOAD_PLUGINS=a,b`` limits the third-party packages that load; the built-ins
always load.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from typing import Any

import pluggy

from ..errors import UserError
from . import hookspecs
from .types import KINDS, Family

GROUP = "cifarx"
BUILTIN_PACKAGE = "cifarx"
ALLOW_ENV = "CIFARX_LOAD_PLUGINS"


HOOKS = tuple(sorted(name for name, f in vars(hookspecs).items() if hasattr(f, f"{GROUP}_spec")))


def _canonical(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package.strip()).lower()


def parse_allow(value: str | None) -> set[str] | None:
    """The packages ``CIFARX_LOAD_PLUGINS`` names (``"a, b"`` -> ``{"a", "b"}``); None if unset."""
    if value is None:
        return None
    return {_canonical(p) for p in value.split(",") if p.strip()}


def unknown_hooks(plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no hookspec declares: usually a misspelled name.

    pluggy's ``check_pending()`` finds them, but raises for the first one in the whole manager;
    checking each plugin in a manager of its own keeps one bad package from hiding the others.
    """
    alone = pluggy.PluginManager(GROUP)
    alone.add_hookspecs(hookspecs)
    alone.register(plugin)
    try:
        alone.check_pending()
    except pluggy.PluginValidationError:
        return sorted(caller.name for caller in alone.get_hookcallers(plugin)
                      if not caller.has_spec()
                      and not all(impl.optionalhook for impl in caller.get_hookimpls()))
    return []


def _unknown_hooks_problem(package: str, unknown: list[str]) -> str:
    named = []
    for hook in unknown:
        close = difflib.get_close_matches(hook, HOOKS, n=1)
        named.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"plugin package {package}: unknown hook{'s' if len(named) > 1 else ''} "
            f"{', '.join(named)}, ignored; the hooks are {', '.join(HOOKS)}")


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

    def _matches(self, kind: str, name: str) -> list[Entry]:
        """The registrations that answer for ``name``: exact names first, else families."""
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}")
        exact = [e for e in self.entries if e.kind == kind and e.name == name]
        families = [e for e in self.entries if e.kind == kind and isinstance(e.item, Family)
                    and name.startswith(e.item.prefix) and len(name) > len(e.item.prefix)]
        return exact or families

    def _entry(self, kind: str, name: str) -> Entry:
        """The one registration ``name`` resolves to, or a UserError (unknown name, clash)."""
        found = self._matches(kind, name)
        if not found:
            available = ", ".join(self.names(kind)) or "none installed"
            raise UserError(f"unknown {kind} {name!r}; available: {available}")
        if len(found) > 1:
            raise UserError(self.clash_advice(kind, name))
        return found[0]

    def clash_advice(self, kind: str, name: str) -> str:
        """One sentence: which packages register ``name`` and what resolves the clash.

        (A third-party registration of a built-in's name never gets here: it is dropped at
        load, with a warning.) Between third-party packages, uninstalling one or leaving one
        out of ``CIFARX_LOAD_PLUGINS`` resolves it.
        """
        found = self._matches(kind, name)
        owners = {e.package: f"{e.package} {e.version}".strip() for e in found}
        if len(owners) == 1:
            package = found[0].package
            return (f"{kind} {name!r} is registered more than once by {owners[package]}; "
                    f"{package} must rename all but one of them")
        said = (f"{kind} {name!r} is registered by more than one package "
                f"({' and '.join(owners.values())}); ")
        return (said + f"uninstall all but one of them, or set {ALLOW_ENV} to the third-party "
                f"packages to load, naming only one of these (e.g. {ALLOW_ENV}={found[0].package})")

    def origin(self, kind: str, name: str) -> tuple[str, str]:
        """(package, version) of the plugin ``name`` resolves to; a family member's is its
        family's. Runs record it as ``cifarx.plugin.<kind>.<name> = package==version``."""
        entry = self._entry(kind, name)
        return entry.package, entry.version

    def blame(self, tb) -> Entry | None:
        """The registration whose code raised, from a traceback: the innermost frame in a
        plugin's module whose function is (or is defined inside) one of its callables."""
        owners: dict[str, list[tuple[str, Entry]]] = {}
        for entry in self.entries:
            for value in vars(entry.item).values() if hasattr(entry.item, "__dict__") else ():
                code = getattr(value, "__code__", None)
                if code is not None and getattr(value, "__module__", None):
                    owners.setdefault(code.co_filename, []).append((value.__qualname__, entry))
        found = None
        while tb is not None:
            code = tb.tb_frame.f_code
            for qualname, entry in owners.get(code.co_filename, ()):
                own = code.co_qualname
                if own == qualname or own.startswith(qualname + ".<locals>."):
                    found = entry
                    break
            else:
                if code.co_filename in owners and found is None:
                    found = owners[code.co_filename][0][1]  # a helper in a plugin's module
            tb = tb.tb_next
        return found

    def get(self, kind: str, name: str) -> Any:
        """The plugin object of this kind called ``name``, or a UserError saying what exists."""
        entry = self._entry(kind, name)
        item = entry.item
        if isinstance(item, Family):
            item = item.resolve(name[len(item.prefix):])
            expected = KINDS[kind][1]
            if not isinstance(item, expected):
                raise TypeError(f"{entry.package}: family {entry.name!r} resolved {name!r} to "
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
        # cifarx.testing's selection (the built-ins plus these plugins, nothing else
        # installed), which worker processes rebuild: see portable()
        self.selected: tuple[object, ...] | None = None

    def portable(self) -> list | None:
        """The testing selection in a form that pickles to another process (a module by its
        name, an object as itself), or None when this registry loads what is installed."""
        import types

        if self.selected is None:
            return None
        return [("module", p.__name__) if isinstance(p, types.ModuleType) else ("object", p)
                for p in self.selected]

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
                message = " ".join(str(exc).split())  # one line (pluggy's messages have several)
                self.load_problems.append(
                    f"plugin package {package} ({ep.value}) failed to load: "
                    f"{type(exc).__name__}: {message}")
        for missing in sorted((allow or set()) - seen_packages):
            self.load_problems.append(f"{ALLOW_ENV} names {missing!r}, which is not installed")

    def catalog(self) -> Catalog:
        """Call every plugin's register hooks, each guarded, and collect what they register."""
        entries: list[Entry] = []
        problems = list(self.load_problems)
        for plugin_name, plugin in self.pm.list_name_plugin():
            unknown = unknown_hooks(plugin)
            if unknown:
                package = self.origins.get(plugin_name, (plugin_name, ""))[0]
                problems.append(_unknown_hooks_problem(package, unknown))
        for kind, (hook_name, cls) in KINDS.items():
            # built-ins first: a third-party registration of a built-in's name is then dropped
            impls = sorted(getattr(self.pm.hook, hook_name).get_hookimpls(), key=lambda i: (
                _canonical(self.origins.get(i.plugin_name, (i.plugin_name, ""))[0])
                != BUILTIN_PACKAGE))
            for impl in impls:
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
                for entry in added:
                    problem = _declaration_problem(entry, entries)
                    if problem and not problem.startswith("deprecated: "):
                        problems.append(problem)
                        continue
                    if problem:
                        problems.append(problem[len("deprecated: "):])
                    entries.append(entry)
        return Catalog(entries, problems)


def _declaration_problem(entry: Entry, earlier: list[Entry]) -> str | None:
    """What is wrong with a registration, checked once at load: a built-in's name taken by
    another package (the built-in wins: new built-ins may appear in any release), or an option
    whose default its own type, choices or range refuse. ``deprecated: ...``: a warning only;
    the registration stands."""
    from .options import convert

    where = f"plugin package {entry.package}: {entry.kind} {entry.name!r}"
    if not entry.builtin and any(e.builtin and (e.kind, e.name) == (entry.kind, entry.name)
                                 for e in earlier):
        return (f"{where} is ignored: cifarx has a built-in {entry.kind} of that name (built-ins "
                f"win); {entry.package} must rename it")
    item = entry.item
    for name, option in (getattr(item, "options", None) or {}).items():
        if option.default is None:
            continue
        try:
            convert(option, option.default)
        except ValueError as exc:
            return (f"{where} is ignored: its option {name!r} has the default "
                    f"{option.default!r}, which its own declaration refuses ({exc}); declare "
                    "a default it accepts")
    untyped = getattr(item, "untyped", ())
    if untyped:
        return (f"deprecated: {where}: option{'s' if len(untyped) > 1 else ''} "
                f"{', '.join(map(repr, untyped))} declared as a plain value; declare "
                "Option(default, type, help=...) so that values are checked and typed")
    return None


_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
        _registry.load_entry_points(parse_allow(os.environ.get(ALLOW_ENV)))
    return _registry


def set_registry(new: Registry | None) -> Registry | None:
    """Make ``new`` the process-wide registry (None: load it again on next use); returns the
    previous one, to put back. :mod:`cifarx.testing` uses it."""
    global _registry
    previous, _registry = _registry, new
    return previous


def selecting(plugins: list | tuple) -> Registry:
    """A registry of the built-ins plus ``plugins`` (modules or objects) and nothing else
    installed; :mod:`cifarx.testing` makes one, and a worker process rebuilds it from
    :meth:`Registry.portable`."""
    import importlib

    registry = Registry()
    registry.load_entry_points(allow=set())  # the built-ins, no third-party package
    chosen = []
    for plugin in plugins:
        if isinstance(plugin, tuple):  # from portable()
            kind, value = plugin
            plugin = importlib.import_module(value) if kind == "module" else value
        chosen.append(plugin)
        name = getattr(plugin, "__name__", type(plugin).__name__)
        if registry.pm.has_plugin(name):  # two objects of one class
            name = f"{name}-{id(plugin)}"
        registry.register(plugin, name=name)
    registry.selected = tuple(chosen)
    return registry


def catalog() -> Catalog:
    return registry().catalog()
