"""framework/ as packages (issue 18): no import circle, no module over 400 lines but the
listed ones, the old module paths give the same modules, and the code here uses the new ones."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cifarx._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = ROOT / "framework"
LIMIT = 400
LONGER = {  # path under framework/ -> why it stays whole
    "training/loop.py": "one job: the training loop (its checkpoints, stops and signals)",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(FRAMEWORK.rglob("*.py")):
        rel = path.relative_to(FRAMEWORK).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(("cifarx",) + parts)] = path
    return found


def module_level_imports(name: str, path: Path, known) -> set[str]:
    """The cifarx modules ``name`` imports when it is imported (not those its functions import,
    nor those under ``if TYPE_CHECKING``), with the packages they are in."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    own = set()
    up = name
    while up:
        own.add(up)
        up = up.rpartition(".")[0]

    def add(module):  # importing a module imports its packages (those not around this one)
        while module and module not in own:
            if module in known:
                found.add(module)
            module = module.rpartition(".")[0]

    def visit(statements):
        for st in statements:
            if isinstance(st, ast.Import):
                for a in st.names:
                    add(a.name)
            elif isinstance(st, ast.ImportFrom):
                base = st.module or ""
                if st.level:
                    base = package
                    for _ in range(st.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{st.module}" if st.module else base
                add(base)
                for a in st.names:
                    add(f"{base}.{a.name}") if f"{base}.{a.name}" in known else None
            elif isinstance(st, ast.If) and "TYPE_CHECKING" in ast.unparse(st.test):
                continue
            elif isinstance(st, (ast.If, ast.Try, ast.With)):
                visit(st.body)
                visit(getattr(st, "orelse", []))
                for handler in getattr(st, "handlers", []):
                    visit(handler.body)
                visit(getattr(st, "finalbody", []))

    visit(tree.body)
    found.discard(name)
    return found


def test_no_import_circle():
    known = modules()
    graph = {name: module_level_imports(name, path, known) for name, path in known.items()}
    circles = []
    state = {}

    def walk(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_every_module_imports():
    names = sorted(name for name in modules() if not name.endswith("__main__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_module_is_too_long():
    long = {str(path.relative_to(FRAMEWORK)): len(path.read_text().splitlines())
            for path in modules().values()}
    over = {path: n for path, n in long.items() if n > LIMIT and path not in LONGER}
    assert not over, f"over {LIMIT} lines (split them, or list them in LONGER with why): {over}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == MOVED[old] and sys.modules[old] is module


def test_the_documented_paths():
    """What the README, examples/ and plugins/ import by the old paths is what the new paths
    hold."""
    import cifarx.studies.trials as trials
    import cifarx.training.data as data
    from cifarx.cli import app, main
    from cifarx.config import TrainConfig
    from cifarx.data import download, extract, gunzip, md5sum
    from cifarx.runs import Tracking, train_run
    from cifarx.trials import Outcome, Trial, run_trial

    assert (Outcome, Trial, run_trial) == (trials.Outcome, trials.Trial, trials.run_trial)
    assert (download, extract, gunzip, md5sum) == (data.download, data.extract, data.gunzip,
                                                   data.md5sum)
    assert TrainConfig.__module__ == "cifarx.training.config"
    assert (Tracking.__module__, train_run.__module__) == ("cifarx.runs.common",
                                                           "cifarx.runs.train")
    assert callable(app) and callable(main)
    for old in ("adversarial", "evaluation", "figures", "hookspecs", "options", "plugin_types",
                "registry", "testing"):
        importlib.import_module(f"cifarx.{old}")


def test_the_code_here_uses_the_new_paths():
    old = {path.split(".")[1] for path in MOVED}
    found = []
    for top in ("framework", "plugins", "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "test_layout.py" or path.name == "_moved.py":
                continue
            tree = ast.parse(path.read_text())
            for st in ast.walk(tree):
                if isinstance(st, ast.ImportFrom) and st.module and not st.level:
                    bits = st.module.split(".")
                    if bits[0] == "cifarx" and len(bits) == 2 and bits[1] in old:
                        found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
                    if st.module == "cifarx" and {a.name for a in st.names} & old:
                        found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
                elif isinstance(st, ast.Import):
                    for a in st.names:
                        bits = a.name.split(".")
                        if bits[0] == "cifarx" and len(bits) == 2 and bits[1] in old:
                            found.append(f"{path.relative_to(ROOT)}:{st.lineno}")
    assert not found, f"old module paths (see framework/_moved.py): {found}"


OLD_STYLE_PLUGIN = '''
"""An executor plugin written before the packages: it imports by the old module paths."""
from cifarx.hookspecs import hookimpl
from cifarx.options import Option
from cifarx.plugin_types import Executor
from cifarx.trials import Outcome, run_trial


def run_in_turn(trials, on_outcome, note="old"):
    for trial in trials:
        outcome = run_trial(trial)
        assert isinstance(outcome, Outcome)
        on_outcome(outcome)


@hookimpl
def register_executors(register):
    register(Executor(name="in-turn", run=run_in_turn, summary="one trial after another",
                      options={"note": Option("old", str, help="a note")}))
'''


def test_a_plugin_written_against_the_old_paths_runs_a_sweep(tmp_path, data_dir, monkeypatch):
    """A third-party plugin that imports cifarx.trials, cifarx.options, ... (the paths before
    the packages) loads and runs, unchanged."""
    import json

    from cifarx.testing import run_cli

    (tmp_path / "old_style_plugin.py").write_text(OLD_STYLE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = importlib.import_module("old_style_plugin")
    study = tmp_path / "study.toml"
    study.write_text('experiment = "old-paths"\nseeds = [0]\n[train]\narch = "table1"\niters = 2\n'
                     'batch-size = 10\n[grid]\nlr = [0.01, 0.1]\n')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli("sweep", str(study), "--executor", "in-turn", "--executor-opt",
                     "note=kept", "--set", f"data-dir={data_dir}", "--tracking-uri", uri,
                     plugins=[plugin])
    assert result.exit_code == 0, result.stdout + result.stderr
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("old-paths").experiment_id])
    trials = [r for r in runs if "cifarx.trial" in r.data.tags]
    sweep = next(r for r in runs if r.data.tags.get("cifarx.sweep") == "true")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert sweep.data.params["executor"] == "in-turn"
    assert sweep.data.params["executor.note"] == "kept"
    assert json.loads(sweep.data.tags["cifarx.executor.options"]) == {"note": "kept"}
