"""Every hook has a test plugin and an example in the documentation's plugin guide, and every
example there runs; the generated reference covers every command and built-in plugin; the
README's links resolve; the CLI, TrainConfig and MLproject declare the same options; `--help`
stays light."""

from pathlib import Path

import pytest

from cifarx.plugin_api import hookspecs
from cifarx.plugin_api.types import KINDS

from test_registry import EveryKind

HOOKS = {name for name in dir(hookspecs) if name.startswith("register_")}
ROOT = Path(__file__).resolve().parents[1]
PLUGIN_GUIDE = ROOT / "docs" / "plugins"
GUIDE = "\n".join(p.read_text() for p in sorted(PLUGIN_GUIDE.glob("*.md")))


def test_every_kind_has_a_hook_and_every_hook_a_kind():
    assert HOOKS == {hook for hook, _ in KINDS.values()}


def test_every_hook_is_exercised_by_the_test_plugin():
    assert HOOKS == {name for name in dir(EveryKind) if name.startswith("register_")}


def test_every_hook_is_documented_with_an_example():
    for hook in HOOKS:
        assert f"def {hook}(register)" in GUIDE, f"the plugin guide has no example of {hook}"


def guide_examples() -> list[str]:
    """Each ```python block of the plugin guide that defines a hook."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", GUIDE, flags=re.S)
    return [b for b in blocks if "@hookimpl" in b]


def guide_plugins():
    """The plugin guide's examples as modules, but the executor that spawns processes: its
    workers import it by name (test_spawn_executor_example_runs_trials does)."""
    import types

    modules = []
    for i, source in enumerate(b for b in guide_examples() if "get_context(\"spawn\")" not in b):
        module = types.ModuleType(f"guide_example_{i}")
        exec(compile(source, f"plugin guide example {i}", "exec"), module.__dict__)
        modules.append(module)
    return modules


def test_guide_plugin_examples_run(register_plugin, tmp_path):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cifarx.plugin_api.registry import registry

    assert len(guide_examples()) == 9
    modules = guide_plugins()
    assert len(modules) == 8
    for i, module in enumerate(modules):
        register_plugin(module, f"guide-{i}")
    cat = registry().catalog()
    assert not [p for p in cat.problems if "guide" in p]

    x = torch.rand(4, 3, 32, 32)
    assert cat.get("architecture", "mlp").build()(x).shape == (4, 10)
    assert cat.get("architecture", "mlp:wide").build()(x).shape == (4, 10)
    inverted = cat.get("augmentation", "invert").apply(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.allclose(inverted, 1 - x)
    targets = torch.eye(10)[torch.arange(4)]
    mixed, soft = cat.get("augmentation", "blend").apply(x, targets,
                                                         torch.Generator().manual_seed(0),
                                                         weight=0.2)
    assert mixed.shape == x.shape and torch.allclose(soft.sum(1), torch.ones(4))

    np.savez(tmp_path / "images.npz", x_train=np.zeros((6, 3, 8, 8), np.uint8),
             y_train=np.arange(6) % 2, x_test=np.zeros((2, 3, 8, 8), np.uint8),
             y_test=np.array([0, 1]), classes=np.array(["a", "b"]))
    data = cat.get("dataset", "npz").load(tmp_path, "all")
    assert data.classes == ("a", "b") and data.train_images.shape == (6, 3, 8, 8)

    net = cat.get("architecture", "mlp").build()
    probe = cat.get("probe", "grad-total")
    assert probe.options["ord"].choices == ("2", "inf") and probe.options["ord"].default == "2"
    read, read_max = probe.attach(net), probe.attach(net, ord="inf")
    F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
    assert read()["grad_total/l2"] > 0
    assert read_max()["grad_total/linf"] == max(p.grad.abs().max() for p in net.parameters())

    attack = cat.get("attack", "fgsm-example").build(net.eval(), eps=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    result = attack(x, labels, torch.Generator().manual_seed(0))
    adv = result.images
    assert 0 <= adv.min() and adv.max() <= 1
    assert torch.allclose((adv - x).abs().max(), torch.tensor(0.1), atol=1e-6)
    assert result.steps.tolist() == [1] * 4
    assert torch.equal(result.success, net(adv).argmax(1) != labels)

    from cifarx import OptionError
    from cifarx.studies.trials import Outcome

    inline = cat.get("executor", "inline")
    example = next(m for m in modules if hasattr(m, "run_inline"))
    example.run_trial = lambda trial: Outcome(trial, "KILLED" if trial == "b" else "FINISHED")
    heard = []
    with pytest.raises(KeyboardInterrupt):
        inline.run(["a", "b", "c"], heard.append, max_trials=10)
    assert [(o.trial, o.status) for o in heard] == [("a", "FINISHED"), ("b", "KILLED")]
    with pytest.raises(OptionError, match="max_trials"):
        inline.check(["a", "b", "c"], max_trials=2)

    from cifarx import AnalysisData

    occlusion = cat.get("analysis", "occlusion")
    model = cat.get("architecture", "mlp").build().eval()
    data = AnalysisData(images=x, labels=torch.arange(4), indices=torch.arange(4),
                        classes=tuple("abcdefghij"), test_images=(x * 255).byte(),
                        test_labels=torch.arange(4))
    found = occlusion.analyze(model, data, window=8)
    assert found.files["attributions/occlusion.pt"]["maps"].shape == (4, 32, 32)
    assert found.figure is not None and "analysis/occlusion/max_drop" in found.metrics
    with pytest.raises(OptionError, match="window"):
        occlusion.check(model, data, window=40)


def test_spawn_executor_example_runs_trials(tmp_path, monkeypatch, tracking_uri, data_dir):
    """The guide's cross-process executor, as an importable module: each trial in a fresh
    interpreter; a trial that fails is reported FAILED, the others FINISHED."""
    import importlib

    import mlflow

    from cifarx.studies.trials import Trial
    from cifarx.training.config import TrainConfig

    (source,) = [b for b in guide_examples() if "get_context(\"spawn\")" in b]
    (tmp_path / "guide_spawn_executor.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned workers import it from here
    module = importlib.import_module("guide_spawn_executor")

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name("guide-spawn")
    experiment = found.experiment_id if found else client.create_experiment("guide-spawn")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    base = dict(iters=2, batch_size=10, eval_every=2, device="cpu", threads=1,
                data_dir=str(data_dir))
    trials = [Trial(key=f"t{i}", number=i, config=TrainConfig(**base, seed=i, arch=arch),
                    axes={"arch": arch}, tracking_uri=tracking_uri, experiment="guide-spawn",
                    parent=parent, executor="spawn")
              for i, arch in enumerate(["table1", "no-such-arch", "table1"])]
    heard = []
    module.run_spawned(iter(trials), heard.append, workers=2)
    assert sorted((o.trial.number, o.status) for o in heard) == \
        [(0, "FINISHED"), (1, "FAILED"), (2, "FINISHED")], [o.error for o in heard]
    assert "no-such-arch" in next(o.error for o in heard if o.status == "FAILED")


# --- the documentation site ------------------------------------------------------------------

def reference_module():
    """docs/hooks/reference.py, the MkDocs hook that generates the Reference pages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference",
                                                  ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_documents_every_command_and_option():
    import re

    reference = reference_module()
    text = reference.commands_markdown()
    for command in ("train", "evaluate", "analyze", "plugins", "describe", "ui", "attack",
                    "transfer", "sweep", "sync"):
        assert f"## cifarx {command}\n" in text, command
    for name in reference.command_names():
        for option in cli_options(name).values():
            if getattr(option, "hidden", False) or option.param_type_name != "option":
                continue
            for flag in (*option.opts, *option.secondary_opts):
                assert re.search(rf"## cifarx {name}\n(?:(?!\n## ).)*[`/ ]{flag}[` ]", text,
                                 flags=re.S), f"cifarx {name} {flag} is not in the reference"
    # what --help shows as the default
    assert "| `--iters <int>` | Training iterations. | `2000` |" in text


def test_the_reference_documents_every_builtin_plugin_and_option():
    from cifarx.plugin_api.registry import registry

    reference = reference_module()
    text = reference.plugins_markdown()
    builtins = [e for e in registry().catalog().entries if e.builtin]
    assert len(builtins) > 30
    sections = {}  # (kind, name) -> its section of the page
    for section in text.split("\n### ")[1:]:
        kind, name = section.split("`")[:2]
        sections[(kind.strip(), name)] = section
    assert set(sections) == {(e.kind, e.name) for e in builtins}
    for entry in builtins:
        section = sections[(entry.kind, entry.name)]
        assert entry.summary and reference.cell(entry.summary) in section
        item = entry.item.resolve("resnet18") if hasattr(entry.item, "prefix") else entry.item
        for option, spec in item.options.items():  # a family: a member's options
            assert f"| `{option}` |" in section, (entry.kind, entry.name, option)
            assert spec.accepted() in section, (entry.kind, entry.name, option)
    hooks = reference.hookspecs_markdown()
    assert all(f"`{hook}(register)`" in hooks for hook in HOOKS)


def test_the_docs_pages_hold_a_marker_for_each_generated_part():
    reference = reference_module()
    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for marker in reference.MARKERS:
        assert marker in pages, marker


def test_the_readme_links_resolve_and_it_keeps_the_two_commands():
    import re

    readme = (ROOT / "README.md").read_text()
    assert "make run " in readme and "make test " in readme  # CI runs the README's make test
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) > 10
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


# --- one declaration of the train options -------------------------------------------------

def cli_options(command_name: str) -> dict:
    """A command's options as click sees them: {flag as a name (--batch-size -> batch_size):
    click parameter}."""
    import typer.main

    from cifarx.cli import app

    group = typer.main.get_command(app)
    return {p.opts[0].lstrip("-").replace("-", "_"): p for p in group.commands[command_name].params}


# CLI flags that are not training options: where the run is logged, and a shorthand.
CLI_ONLY = {"experiment", "run_name", "tracking_uri", "pretrained", "description", "tag",
            "system_metrics", "register_model", "resume", "analyze", "analysis_opt"}
# TrainConfig field -> the CLI's name for it, where they differ.
CLI_NAME = {"probes": "probe", "arch_options": "arch_opt", "aug_options": "aug_opt",
            "probe_options": "probe_opt", "dataset_options": "dataset_opt",
            "attack_options": "attack_opt"}


def test_cli_train_and_trainconfig_declare_the_same_options_and_defaults():
    import dataclasses

    from cifarx.training.config import TrainConfig

    options = cli_options("train")
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(options) - CLI_ONLY == {CLI_NAME.get(name, name) for name in fields}
    for name, default in fields.items():
        cli_default = options[CLI_NAME.get(name, name)].default
        if isinstance(default, tuple):  # lists and repeatable flags: empty or a comma list
            assert (cli_default or ()) in ((), None) if not default else \
                tuple(cli_default.split(",")) == default, name
        else:
            assert cli_default == default, name


def test_mlproject_declares_cli_options_with_their_defaults():
    import yaml

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for entry, spec in project["entry_points"].items():
        options = cli_options(entry)
        for name, parameter in spec["parameters"].items():
            assert name in options, f"{entry}: MLproject parameter {name} is not a cifarx option"
            flag = "--" + name.replace("_", "-")
            assert f"{flag} {{{name}}}" in spec["command"], f"{entry}: {name} is not passed"
            if "default" in parameter:
                default = options[name].default
                assert str(parameter["default"]) in (str(default), f"{default}.0") or \
                    (parameter["default"] == "" and not default), (entry, name)
    # Defaults that depend on the run are left to it: declaring them would override them.
    train = project["entry_points"]["train"]["parameters"]
    assert not {"lr", "optimizer", "momentum", "weight_decay", "schedule", "train_split"} & \
        set(train)


# --- start-up -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["attack", "--help"],
                                  ["analyze", "--help"],
                                  ["sweep", "--help"]])
def test_help_imports_no_torch_mlflow_or_matplotlib(args):
    import subprocess
    import sys

    code = ("import sys\nfrom cifarx.cli import main\nsys.argv = ['cifarx', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'mlflow', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]


def test_help_texts_survive_rich_markup():
    """Typer renders help as rich markup: an unescaped "[train]" would vanish from the text."""
    import typer.main
    from rich.text import Text

    from cifarx.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for text in [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]:
            shown = Text.from_markup(text).plain
            assert shown == text.replace("\\[", "["), f"cifarx {name}: {text!r} shows as {shown!r}"
