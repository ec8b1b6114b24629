import types

import pytest
import torch
from torch import nn

from cifarx import (Analysis, Architecture, Attack, AttackResult, Augmentation, Dataset, Family,
                    Findings, ImageData, Probe, UserError, hookimpl)
from cifarx.plugin_api.registry import Registry, registry
from cifarx.plugin_api.types import Executor

from fake_dists import ARCH_PLUGIN, activate, make_dist

BUILTINS = {
    ("architecture", "table1"), ("augmentation", "raw"), ("augmentation", "normalize"),
    ("augmentation", "flip"), ("augmentation", "crop"), ("dataset", "cifar10"),
    ("attack", "ifgsm"), ("attack", "fgsm"), ("attack", "pgd"), ("attack", "fool-noise"),
    ("executor", "local"), ("executor", "ray"),
}


def loaded(allow=None) -> Registry:
    reg = Registry()
    reg.load_entry_points(allow)
    return reg


def test_builtins_load_through_entry_points():
    cat = loaded().catalog()
    found = {(e.kind, e.name) for e in cat.entries if e.builtin}
    assert BUILTINS <= found
    assert all(e.package == "cifarx" and e.version for e in cat.entries if e.builtin)
    assert cat.get("architecture", "table1").name == "table1"


def test_third_party_package_is_found_with_its_version(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-good", "good_plugin",
              ARCH_PLUGIN.format(name="good", package="cifarx-good"), version="2.5")
    activate(tmp_path, monkeypatch)
    entry = next(e for e in loaded().catalog().entries if e.name == "good")
    assert (entry.kind, entry.package, entry.version) == ("architecture", "cifarx-good", "2.5")


def test_a_package_that_fails_to_import_is_one_problem_and_the_rest_works(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-broken", "broken_plugin", "import no_such_module_here\n")
    make_dist(tmp_path, "cifarx-good", "good_plugin",
              ARCH_PLUGIN.format(name="good", package="cifarx-good"))
    activate(tmp_path, monkeypatch)
    cat = loaded().catalog()
    assert len(cat.problems) == 1
    assert "cifarx-broken" in cat.problems[0] and "ModuleNotFoundError" in cat.problems[0]
    assert cat.get("architecture", "good") and cat.get("architecture", "table1")


def test_a_hook_that_raises_is_one_problem_and_registers_nothing(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-raises", "raising_plugin", '''
        from torch import nn
        from cifarx import Architecture, hookimpl

        @hookimpl
        def register_architectures(register):
            register(Architecture(name="half", build=lambda **kw: nn.Flatten()))
            raise RuntimeError("boom")
    ''')
    activate(tmp_path, monkeypatch)
    cat = loaded().catalog()
    assert any("cifarx-raises" in p and "boom" in p for p in cat.problems)
    assert "half" not in cat.names("architecture")
    assert "table1" in cat.names("architecture")


def test_registering_the_wrong_type_is_a_problem(register_plugin):
    class Wrong:
        @hookimpl
        def register_probes(self, register):
            register(Architecture(name="not-a-probe", build=nn.Flatten))

    register_plugin(Wrong(), "wrong")
    cat = registry().catalog()
    assert any("wrong" in p and "expected Probe" in p for p in cat.problems)


def test_name_clash_names_both_packages_and_only_that_name_fails(tmp_path, monkeypatch):
    for package, module in (("cifarx-one", "one_plugin"), ("cifarx-two", "two_plugin")):
        make_dist(tmp_path / package, package, module,
                  ARCH_PLUGIN.format(name="same", package=package))
        activate(tmp_path / package, monkeypatch)
    cat = loaded().catalog()
    assert set(cat.clashes()) == {("architecture", "same")}
    with pytest.raises(UserError, match="cifarx-one.*cifarx-two|cifarx-two.*cifarx-one"):
        cat.get("architecture", "same")
    assert cat.get("architecture", "table1").name == "table1"


def test_allow_list_limits_third_party_packages_but_not_builtins(tmp_path, monkeypatch):
    for package, module in (("cifarx-one", "one_plugin"), ("cifarx-two", "two_plugin")):
        make_dist(tmp_path / package, package, module,
                  ARCH_PLUGIN.format(name=package, package=package))
        activate(tmp_path / package, monkeypatch)
    cat = loaded(allow={"cifarx-two", "not-installed"}).catalog()
    names = cat.names("architecture")
    assert "cifarx-two" in names and "cifarx-one" not in names and "table1" in names
    assert any("not-installed" in p for p in cat.problems)


def test_allow_list_from_the_environment(tmp_path, monkeypatch):
    import cifarx.plugin_api.registry as reg_module

    make_dist(tmp_path, "cifarx-one", "one_plugin", ARCH_PLUGIN.format(name="one", package="x"))
    activate(tmp_path, monkeypatch)
    monkeypatch.setattr(reg_module, "_registry", None)
    monkeypatch.setenv("CIFARX_LOAD_PLUGINS", "")
    assert "one" not in reg_module.catalog().names("architecture")
    monkeypatch.setattr(reg_module, "_registry", None)
    monkeypatch.setenv("CIFARX_LOAD_PLUGINS", "cifarx_one")  # names compare as pip does
    assert "one" in reg_module.catalog().names("architecture")


def test_unknown_name_lists_what_is_available():
    with pytest.raises(UserError, match=r"unknown architecture 'nope'; available: .*table1"):
        registry().catalog().get("architecture", "nope")


def test_family_answers_every_name_with_its_prefix(register_plugin):
    class Zoo:
        @hookimpl
        def register_architectures(self, register):
            def resolve(rest):
                if rest not in ("small", "large"):
                    raise UserError(f"zoo has no {rest!r}")
                return Architecture(name=rest, build=lambda **kw: nn.Flatten(), summary=rest)
            register(Family(prefix="zoo:", resolve=resolve, summary="the zoo"))

    register_plugin(Zoo(), "zoo")
    cat = registry().catalog()
    assert "zoo:*" in cat.names("architecture")
    assert cat.get("architecture", "zoo:small").name == "zoo:small"
    with pytest.raises(UserError, match="zoo has no 'huge'"):
        cat.get("architecture", "zoo:huge")
    with pytest.raises(UserError, match="unknown architecture"):
        cat.get("architecture", "zoo:")


class EveryKind:
    """A test plugin with one registration of each kind: every hook is exercised."""

    @hookimpl
    def register_datasets(self, register):
        def load(data_dir, split):
            images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
            labels = torch.tensor([0, 1, 0, 1])
            return ImageData(images, labels, images, labels, ("a", "b"), "memory")
        register(Dataset(name="test-data", load=load, splits=("all",), summary="four images"))

    @hookimpl
    def register_augmentations(self, register):
        register(Augmentation(name="test-invert", stage="pixels", apply=lambda x, g: 1 - x))

    @hookimpl
    def register_architectures(self, register):
        register(Architecture(name="test-arch", build=lambda **kw: nn.Flatten()))

    @hookimpl
    def register_probes(self, register):
        register(Probe(name="test-probe", attach=lambda model: lambda: {"probe/x": torch.tensor(1.0)}))

    @hookimpl
    def register_attacks(self, register):
        register(Attack(name="test-attack", build=lambda model, **o: lambda x, y, g: AttackResult(
            x.flip(-1), torch.zeros(len(x)), torch.zeros(len(x), dtype=torch.bool))))

    @hookimpl
    def register_executors(self, register):
        def run(trials, on_outcome):
            from cifarx.studies.trials import run_trial
            for trial in trials:
                on_outcome(run_trial(trial))
        register(Executor(name="test-executor", run=run, summary="every trial in this process"))

    @hookimpl
    def register_analyses(self, register):
        register(Analysis(name="test-analysis", analyze=lambda model, data: Findings(
            metrics={"analysis/images": len(data.labels)}, summary="counted")))


def test_every_kind_registers_and_is_looked_up(register_plugin):
    register_plugin(EveryKind(), "every-kind")
    cat = registry().catalog()
    assert cat.get("dataset", "test-data").load(None, "all").classes == ("a", "b")
    assert cat.get("augmentation", "test-invert").apply(torch.zeros(1), None).item() == 1
    assert isinstance(cat.get("architecture", "test-arch").build(), nn.Flatten)
    assert cat.get("probe", "test-probe").attach(None)()["probe/x"].item() == 1
    x = torch.arange(4.0).reshape(1, 1, 1, 4)
    flipped = cat.get("attack", "test-attack").build(None)(x, None, None).images
    assert flipped.flatten().tolist() == [3, 2, 1, 0]
    data = types.SimpleNamespace(labels=torch.zeros(3))
    assert cat.get("analysis", "test-analysis").analyze(None, data).metrics == {
        "analysis/images": 3}
    assert {e.package for e in cat.entries if e.name.startswith("test-")} == {"every-kind"}


def test_unregistering_removes_the_plugin(register_plugin):
    register_plugin(EveryKind(), "every-kind")
    registry().unregister("every-kind")
    assert "test-arch" not in registry().catalog().names("architecture")
    registry().register(EveryKind(), "every-kind")  # so the fixture's unregister succeeds


def test_augmentation_checks_its_stage_and_callable():
    with pytest.raises(ValueError, match="stage"):
        Augmentation(name="x", stage="later", apply=lambda x, g: x)
    with pytest.raises(ValueError, match="needs fit="):
        Augmentation(name="x", stage="normalize", apply=lambda x, g: x)
    with pytest.raises(ValueError, match="needs apply="):
        Augmentation(name="x", stage="pixels")


TYPO_PLUGIN = '''
    from torch import nn
    from cifarx import Architecture, hookimpl

    @hookimpl
    def register_architecture(register):  # no s: no hookspec has this name
        register(Architecture(name="typo-arch", build=lambda **kw: nn.Flatten()))

    @hookimpl
    def register_augmentations(register):  # a valid hook: it still loads
        from cifarx import Augmentation
        register(Augmentation(name="typo-aug", stage="pixels", apply=lambda x, g: x))

    @hookimpl
    def setup_everything(register):
        pass
'''


def test_a_misspelled_hook_is_one_problem_naming_the_package_and_the_valid_hooks(tmp_path,
                                                                                  monkeypatch):
    make_dist(tmp_path / "typo", "cifarx-typo", "typo_plugin", TYPO_PLUGIN)
    activate(tmp_path / "typo", monkeypatch)
    make_dist(tmp_path / "typo2", "cifarx-typo-two", "typo_two_plugin", '''
        from cifarx import hookimpl

        @hookimpl
        def register_probe(register):
            pass
    ''')
    activate(tmp_path / "typo2", monkeypatch)
    make_dist(tmp_path / "good", "cifarx-good", "good_plugin",
              ARCH_PLUGIN.format(name="good", package="cifarx-good"))
    activate(tmp_path / "good", monkeypatch)
    cat = loaded().catalog()

    [typo] = [p for p in cat.problems if p.startswith("plugin package cifarx-typo: ")]
    assert "\n" not in typo
    assert "unknown hooks 'register_architecture' (did you mean 'register_architectures'?)" in typo
    assert "'setup_everything'" in typo
    assert ("the hooks are register_analyses, register_architectures, register_attacks, "
            "register_augmentations, register_datasets, register_executors, "
            "register_probes") in typo
    # one bad package does not hide another
    assert any("cifarx-typo-two" in p and "'register_probe' (did you mean 'register_probes'?)" in p
               for p in cat.problems)
    assert len(cat.problems) == 2
    # its valid hooks load, and so does everything else
    assert "typo-aug" in cat.names("augmentation") and "typo-arch" not in cat.names("architecture")
    assert cat.get("architecture", "good") and cat.get("architecture", "table1")


def test_an_optional_hook_without_a_spec_is_not_a_problem(register_plugin):
    class Optional:
        @hookimpl(optionalhook=True)
        def register_later(self, register):
            pass

    register_plugin(Optional(), "optional")
    assert not [p for p in registry().catalog().problems if "optional" in p]


def test_a_hookimpl_with_a_wrong_argument_is_a_one_line_problem(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-args", "args_plugin", '''
        from cifarx import hookimpl

        @hookimpl
        def register_architectures(reg):
            pass
    ''')
    activate(tmp_path, monkeypatch)
    [problem] = loaded().catalog().problems
    assert "cifarx-args" in problem and "PluginValidationError" in problem and "\n" not in problem


@pytest.mark.parametrize("value", ["cifarx-two, cifarx-one", " cifarx_two ,cifarx-one,",
                                   "cifarx-two,, cifarx-one "])
def test_allow_list_strips_spaces_around_names(tmp_path, monkeypatch, value):
    import cifarx.plugin_api.registry as reg_module

    for package, module in (("cifarx-one", "one_plugin"), ("cifarx-two", "two_plugin")):
        make_dist(tmp_path / package, package, module,
                  ARCH_PLUGIN.format(name=package, package=package))
        activate(tmp_path / package, monkeypatch)
    monkeypatch.setattr(reg_module, "_registry", None)
    monkeypatch.setenv("CIFARX_LOAD_PLUGINS", value)
    cat = reg_module.catalog()
    assert {"cifarx-one", "cifarx-two"} <= set(cat.names("architecture"))
    assert not cat.problems


def test_parse_allow():
    from cifarx.plugin_api.registry import parse_allow

    assert parse_allow(None) is None
    assert parse_allow("") == set() == parse_allow(" , ")
    assert parse_allow(" Pkg.A , pkg_b") == {"pkg-a", "pkg-b"}


def test_a_clash_between_third_party_packages_says_uninstall_or_limit_the_allow_list(tmp_path,
                                                                                     monkeypatch):
    for package, module in (("cifarx-one", "one_plugin"), ("cifarx-two", "two_plugin")):
        make_dist(tmp_path / package, package, module,
                  ARCH_PLUGIN.format(name="same", package=package), version="1.2")
        activate(tmp_path / package, monkeypatch)
    cat = loaded().catalog()
    advice = cat.clash_advice("architecture", "same")
    assert advice.startswith("architecture 'same' is registered by more than one package (")
    assert "cifarx-one 1.2" in advice and "cifarx-two 1.2" in advice
    assert "uninstall all but one of them, or set CIFARX_LOAD_PLUGINS" in advice
    with pytest.raises(UserError) as raised:
        cat.get("architecture", "same")
    assert str(raised.value) == advice
    with pytest.raises(UserError, match="registered by more than one package"):
        cat.origin("architecture", "same")
    # and the allow list does resolve it
    only_one = loaded(allow={"cifarx-one"}).catalog()
    assert only_one.origin("architecture", "same") == ("cifarx-one", "1.2")


def test_a_builtins_name_taken_by_a_package_is_dropped_with_one_warning(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-bad", "bad_plugin",
              ARCH_PLUGIN.format(name="table1", package="cifarx-bad"))
    activate(tmp_path, monkeypatch)
    cat = loaded().catalog()
    assert ("architecture", "table1") not in cat.clashes()
    assert cat.origin("architecture", "table1")[0] == "cifarx"  # the built-in wins
    (problem,) = [p for p in cat.problems if "cifarx-bad" in p]
    assert problem == ("plugin package cifarx-bad: architecture 'table1' is ignored: cifarx has "
                       "a built-in architecture of that name (built-ins win); cifarx-bad must "
                       "rename it")


FLIP_PLUGIN = """
    from cifarx import Augmentation, hookimpl

    @hookimpl
    def register_augmentations(register):
        register(Augmentation(name="flip", stage="pixels", apply=lambda images, **kw: images,
                              summary="a third-party flip"))
"""


def test_a_package_registering_flip_leaves_the_default_run_alone(tmp_path, monkeypatch, data_dir):
    """The default `--aug flip,crop` exited 2 with a clash error for everyone."""
    from typer.testing import CliRunner

    from cifarx.cli import app
    from cifarx.plugin_api.registry import set_registry

    make_dist(tmp_path / "dist", "cifarx-flipper", "flipper_plugin", FLIP_PLUGIN)
    activate(tmp_path / "dist", monkeypatch)
    previous = set_registry(None)
    try:
        result = CliRunner().invoke(app, ["train", "--iters", "2", "--batch-size", "10",
                                          "--threads", "1", "--data-dir", str(data_dir),
                                          "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    finally:
        set_registry(previous)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "cifarx-flipper" in line]
    assert len(warnings) == 1 and warnings[0].startswith("cifarx: warning: plugin package "
                                                         "cifarx-flipper: augmentation 'flip'")


def test_an_option_whose_default_its_declaration_refuses_is_a_problem_at_load(register_plugin):
    from cifarx import Option

    class Bad:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="bad-default", build=nn.Flatten,
                                  options={"p": Option(5, int, range="[0, 1]")}))
            register(Architecture(name="bad-choice", build=nn.Flatten,
                                  options={"mode": Option("c", choices=("a", "b"))}))
            register(Architecture(name="fine", build=nn.Flatten,
                                  options={"p": Option(1, int, range="[0, 1]")}))

    register_plugin(Bad(), "bad-defaults")
    cat = registry().catalog()
    names = cat.names("architecture")
    assert "fine" in names and "bad-default" not in names and "bad-choice" not in names
    problems = [p for p in cat.problems if "bad-defaults" in p]
    assert len(problems) == 2
    assert "option 'p' has the default 5, which its own declaration refuses (accepted: a whole " \
           "number in [0, 1])" in problems[0]


def test_a_plain_value_option_is_deprecated_but_registered(register_plugin):
    class Old:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="old-style", build=nn.Flatten,
                                  options={"width": 32, "mode": ("a", "b")}))

    register_plugin(Old(), "old-package")
    cat = registry().catalog()
    assert "old-style" in cat.names("architecture")
    (problem,) = [p for p in cat.problems if "old-package" in p]
    assert "option 'width' declared as a plain value; declare Option(default, type" in problem
    assert "'mode'" not in problem  # a tuple of choices is typed by its values


def test_a_package_registering_one_name_twice_is_told_to_rename(register_plugin):
    class Twice:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="twice", build=nn.Flatten))
            register(Architecture(name="twice", build=nn.Flatten))

    register_plugin(Twice(), "twice-package")
    advice = registry().catalog().clash_advice("architecture", "twice")
    assert advice == ("architecture 'twice' is registered more than once by twice-package; "
                      "twice-package must rename all but one of them")


def test_origin_is_the_package_and_version_a_name_resolves_to(tmp_path, monkeypatch):
    make_dist(tmp_path, "cifarx-zoo", "zoo_plugin", '''
        from torch import nn
        from cifarx import Architecture, Family, hookimpl

        @hookimpl
        def register_architectures(register):
            register(Architecture(name="exact", build=lambda **kw: nn.Flatten()))
            register(Family(prefix="zoo:", resolve=lambda rest: Architecture(
                name=rest, build=lambda **kw: nn.Flatten())))
    ''', version="3.1")
    activate(tmp_path, monkeypatch)
    cat = loaded().catalog()
    assert cat.origin("architecture", "exact") == ("cifarx-zoo", "3.1")
    assert cat.origin("architecture", "zoo:anything") == ("cifarx-zoo", "3.1")
    package, version = cat.origin("architecture", "table1")
    assert package == "cifarx" and version
    with pytest.raises(UserError, match="unknown architecture 'nope'"):
        cat.origin("architecture", "nope")


BROKEN_AUG = """
    from cifarx import Augmentation, hookimpl

    def explode(images, generator, **options):
        raise RuntimeError("the shears slipped")

    @hookimpl
    def register_augmentations(register):
        register(Augmentation(name="shear", stage="pixels", apply=explode, summary="broken"))
"""


def test_a_plugin_that_raises_during_training_is_named_in_one_line(tmp_path, monkeypatch,
                                                                   data_dir):
    """It was a 56-line traceback that named no plugin."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from cifarx.cli import app
    from cifarx.plugin_api.registry import set_registry

    make_dist(tmp_path / "dist", "cifarx-shears", "shears_plugin", BROKEN_AUG, version="0.2")
    activate(tmp_path / "dist", monkeypatch)
    uri = f"sqlite:///{tmp_path}/m.db"
    previous = set_registry(None)
    try:
        result = CliRunner().invoke(app, ["train", "--aug", "normalize,shear", "--iters", "2",
                                          "--batch-size", "10", "--threads", "1",
                                          "--data-dir", str(data_dir), "--tracking-uri", uri])
    finally:
        set_registry(previous)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("cifarx:")]
    assert line.startswith("cifarx: error: the augmentation plugin 'shear' of cifarx-shears 0.2 "
                           "failed: RuntimeError: the shears slipped (the traceback is in run ")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_id in line
    assert run.data.tags["cifarx.error"] == "RuntimeError: the shears slipped"
    text = open(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read()
    assert "Traceback" in text and "in explode" in text
