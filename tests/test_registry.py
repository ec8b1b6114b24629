import pytest
import torch
from torch import nn

from cifarx import (Architecture, Attack, AttackResult, Augmentation, Dataset, Family, ImageData,
                    Probe, UserError, hookimpl)
from cifarx.registry import Registry, registry

from fake_dists import ARCH_PLUGIN, activate, make_dist

BUILTINS = {
    ("architecture", "table1"), ("augmentation", "raw"), ("augmentation", "normalize"),
    ("augmentation", "flip"), ("augmentation", "crop"), ("dataset", "cifar10"),
    ("attack", "ifgsm"), ("attack", "fgsm"), ("attack", "pgd"), ("attack", "fool-noise"),
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
    import cifarx.registry as reg_module

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
