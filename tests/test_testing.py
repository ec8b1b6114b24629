"""cifarx.testing: a plugin author's test registers one plugin and runs the CLI with it."""

import json
import re
import sys
import textwrap
import types

import pytest
from torch import nn

import cifarx.plugin_api.registry as registry_module
import cifarx.testing
from cifarx import Architecture, hookimpl
from cifarx.plugin_api.registry import registry
from cifarx.testing import run_cli, use_plugins

from fake_dists import ARCH_PLUGIN, activate, make_dist
from test_registry import BUILTINS


def plugin_module(source: str, name: str = "authors_plugin") -> types.ModuleType:
    module = types.ModuleType(name)
    exec(textwrap.dedent(source), module.__dict__)
    return module


MY_PLUGIN = plugin_module(ARCH_PLUGIN.format(name="authors-arch", package="authors_plugin"))


def listed(result) -> set[tuple[str, str]]:
    assert result.exit_code == 0, result.stderr
    return {(p["kind"], p["name"]) for p in json.loads(result.stdout)["plugins"]}


def test_run_cli_lists_the_plugin_with_the_builtins_and_removes_it_after():
    result = run_cli("plugins", "--json", plugins=[MY_PLUGIN])
    found = json.loads(result.stdout)
    assert listed(result) >= BUILTINS | {("architecture", "authors-arch")}
    [row] = [p for p in found["plugins"] if p["name"] == "authors-arch"]
    assert row["package"] == "authors_plugin"
    assert found["problems"] == []
    assert "authors-arch" not in registry().catalog().names("architecture")
    assert ("architecture", "authors-arch") not in listed(run_cli("plugins", "--json"))


def test_use_plugins_replaces_the_process_wide_registry_and_restores_it():
    before = registry()
    with use_plugins(MY_PLUGIN) as reg:
        assert registry() is reg
        assert registry_module.catalog().get("architecture", "authors-arch").summary == \
            "from authors_plugin"
    assert registry() is before


def test_use_plugins_restores_an_unloaded_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_registry", None)
    with use_plugins(MY_PLUGIN):
        pass
    assert registry_module._registry is None


def test_use_plugins_ignores_other_installed_packages_and_the_allow_list(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-other", "other_plugin",
              ARCH_PLUGIN.format(name="other-arch", package="cifarx-other"))
    activate(tmp_path, monkeypatch)
    monkeypatch.setenv("CIFARX_LOAD_PLUGINS", "cifarx-other")
    names = listed(run_cli("plugins", "--json", plugins=[MY_PLUGIN]))
    assert ("architecture", "authors-arch") in names
    assert ("architecture", "other-arch") not in names
    assert BUILTINS <= names


def test_objects_with_hookimpls_are_plugins_too():
    class Two:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name=self.name, build=lambda **kw: None))

    with use_plugins(Two("first"), Two("second")) as reg:
        assert {"first", "second"} <= set(reg.catalog().names("architecture"))


def test_a_misspelled_hook_shows_as_a_warning_and_a_problem():
    typo = plugin_module('''
        from cifarx import hookimpl

        @hookimpl
        def register_architecture(register):
            pass
    ''', name="typo_plugin")
    result = run_cli("plugins", "--json", plugins=[typo])
    assert result.exit_code == 0
    [problem] = json.loads(result.stdout)["problems"]
    assert "typo_plugin" in problem and "'register_architecture'" in problem
    assert "cifarx: warning: " in result.stderr


def test_stdout_and_stderr_are_apart_and_errors_have_their_exit_code():
    result = run_cli("describe", "no-such-arch", plugins=[MY_PLUGIN])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "unknown architecture 'no-such-arch'" in result.stderr
    assert "authors-arch" in result.stderr


def test_the_docstring_example_runs(tmp_path, monkeypatch):
    """The example in cifarx.testing's docstring is a plugin module and its test module."""
    blocks = re.findall(r"``(\w+\.py)``::\n\n((?:    .*\n|\n)+)", cifarx.testing.__doc__)
    assert [name for name, _ in blocks] == ["my_plugin.py", "test_my_plugin.py"]
    for name, source in blocks:
        (tmp_path / name).write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("my_plugin", "test_my_plugin"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    import test_my_plugin

    tests = [f for name, f in vars(test_my_plugin).items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()


def test_importing_it_imports_neither_the_cli_nor_torch_nor_mlflow():
    import subprocess

    code = ("import sys, cifarx.testing; "
            "print([m for m in ('cifarx.cli', 'torch', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("catch", [False, True])
def test_an_exception_in_a_plugin_propagates_unless_caught(catch):
    boom = plugin_module('''
        from cifarx import Architecture, hookimpl

        def build(**kw):
            raise RuntimeError("boom in build")

        @hookimpl
        def register_architectures(register):
            register(Architecture(name="boom", build=build))
    ''', name="boom_plugin")
    if catch:
        result = run_cli("describe", "boom", plugins=[boom], catch_exceptions=True)
        assert isinstance(result.exception, RuntimeError)
    else:
        with pytest.raises(RuntimeError, match="boom in build"):
            run_cli("describe", "boom", plugins=[boom])


class OnlyHere:
    """A plugin no package installs: it exists only through cifarx.testing's selection."""

    @hookimpl
    def register_architectures(self, register):
        register(Architecture(name="only-here", build=only_here_net, summary="tests only"))


def only_here_net(num_classes=10, in_channels=3, image_size=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))


def test_the_selection_reaches_sweep_workers_and_artifacts_stay_beside_the_store(data_dir,
                                                                                 tmp_path):
    """The local executor's workers loaded whatever was installed (the trial failed: unknown
    architecture), and run_cli wrote ./mlruns into the caller's folder."""
    from mlflow import MlflowClient

    from cifarx.testing import run_cli

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = run_cli("sweep", "--set", "arch=only-here", "--set", "iters=2", "--set",
                     "batch-size=10", "--set", f"data-dir={data_dir}", "--set", "threads=1",
                     "--seeds", "2", "--workers", "2", "--tracking-uri", uri,
                     "--experiment", "selection", plugins=[OnlyHere()])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("selection").experiment_id])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert not (tmp_path / "mlruns").exists()  # the test's own folder (the cwd) stays clean
    assert all(r.info.artifact_uri.startswith((tmp_path / "store" / "mlruns").as_uri())
               for r in runs)
