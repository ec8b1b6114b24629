"""Test helpers for plugin authors: run cifarx with the built-ins and your plugin, nothing else.

``use_plugins(*plugins)`` makes the registry that cifarx and its CLI use hold the built-in
plugins plus the plugin modules or objects you give, whatever else is installed and whatever
``CIFARX_LOAD_PLUGINS`` says, and puts the previous registry back afterwards.
``run_cli(*args, plugins=...)`` runs the ``cifarx`` command in-process that way and returns
click's ``Result``: ``exit_code``, ``stdout`` and ``stderr`` (warnings and errors).

A plugin module, ``my_plugin.py``::

    from torch import nn

    from cifarx import Architecture, hookimpl


    def build_linear(num_classes=10, in_channels=3, image_size=32):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))


    @hookimpl
    def register_architectures(register):
        register(Architecture(name="linear", build=build_linear, summary="one linear layer"))

and its tests, ``test_my_plugin.py``::

    import json

    from cifarx.testing import run_cli, use_plugins

    import my_plugin


    def test_the_architecture_is_listed():
        result = run_cli("plugins", "--json", plugins=[my_plugin])
        assert result.exit_code == 0, result.stderr
        listed = json.loads(result.stdout)
        assert {(p["kind"], p["name"]) for p in listed["plugins"]} >= {("architecture", "linear")}
        assert listed["problems"] == []  # a misspelled hook would be reported here


    def test_describe_builds_it():
        result = run_cli("describe", "linear", plugins=[my_plugin])
        assert result.exit_code == 0, result.stderr
        assert "Linear" in result.stdout


    def test_the_catalog_finds_it():
        with use_plugins(my_plugin) as registry:
            assert registry.catalog().get("architecture", "linear").summary == "one linear layer"

An exception your plugin raises propagates out of ``run_cli`` with its traceback (pass
``catch_exceptions=True`` to get it as ``result.exception`` instead).

Isolation: the selection reaches a sweep's worker processes too (the ``local`` executor
rebuilds it in each worker: a plugin object must then pickle, i.e. its class be defined at a
module's top level), and a run's artifacts go beside its SQLite store (``mlruns/`` next to
the ``.db`` file), never into the folder the test runs in.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .plugin_api.registry import Registry, selecting, set_registry


@contextmanager
def use_plugins(*plugins: object) -> Iterator[Registry]:
    """While the block runs, the process-wide registry holds the built-ins plus ``plugins``.

    Each plugin is a module or an object with ``@hookimpl`` methods; it is listed under its
    ``__name__`` (or its class's name) as its package. Yields the registry.
    """
    registry = selecting(plugins)
    previous = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)


def run_cli(*args: str, plugins: Iterable[object] = (), **invoke: Any):
    """Run ``cifarx *args`` in-process with the built-ins plus ``plugins``; return the Result.

    ``invoke`` goes to ``typer.testing.CliRunner.invoke`` (``input=``, ``env=``,
    ``catch_exceptions=``, which is False here).
    """
    from typer.testing import CliRunner

    from .cli.common import app  # imported here: `import cifarx.testing` stays light

    invoke.setdefault("catch_exceptions", False)
    # a plugin's exception keeps its traceback here (the command line shows one line)
    invoke["env"] = {"CIFARX_TRACEBACK": "1", **(invoke.get("env") or {})}
    with use_plugins(*plugins):
        return CliRunner().invoke(app, [str(a) for a in args], prog_name="cifarx", **invoke)
