"""Every hook has a test plugin and a section in the README's plugin author guide."""

from pathlib import Path

from cifarx import hookspecs
from cifarx.plugin_types import KINDS

from test_registry import EveryKind

HOOKS = {name for name in dir(hookspecs) if name.startswith("register_")}
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_kind_has_a_hook_and_every_hook_a_kind():
    assert HOOKS == {hook for hook, _ in KINDS.values()}


def test_every_hook_is_exercised_by_the_test_plugin():
    assert HOOKS == {name for name in dir(EveryKind) if name.startswith("register_")}


def test_every_hook_is_documented_with_an_example():
    for hook in HOOKS:
        assert f"def {hook}(register)" in README, f"README has no example of {hook}"


def readme_plugins():
    """Each ```python block of the README that defines a hook, as a module."""
    import re
    import types

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    modules = []
    for i, source in enumerate(b for b in blocks if "@hookimpl" in b):
        module = types.ModuleType(f"readme_example_{i}")
        exec(compile(source, f"README example {i}", "exec"), module.__dict__)
        modules.append(module)
    return modules


def test_readme_plugin_examples_run(register_plugin, tmp_path):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cifarx.registry import registry

    modules = readme_plugins()
    assert len(modules) == 6
    for i, module in enumerate(modules):
        register_plugin(module, f"readme-{i}")
    cat = registry().catalog()
    assert not [p for p in cat.problems if "readme" in p]

    x = torch.rand(4, 3, 32, 32)
    assert cat.get("architecture", "mlp").build()(x).shape == (4, 10)
    assert cat.get("architecture", "mlp:wide").build()(x).shape == (4, 10)
    noisy = cat.get("augmentation", "noise").apply(x, torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and 0 <= noisy.min() and noisy.max() <= 1 and not torch.equal(noisy, x)

    np.savez(tmp_path / "images.npz", x_train=np.zeros((6, 3, 8, 8), np.uint8),
             y_train=np.arange(6) % 2, x_test=np.zeros((2, 3, 8, 8), np.uint8),
             y_test=np.array([0, 1]), classes=np.array(["a", "b"]))
    data = cat.get("dataset", "npz").load(tmp_path, "all")
    assert data.classes == ("a", "b") and data.train_images.shape == (6, 3, 8, 8)

    net = cat.get("architecture", "mlp").build()
    probe = cat.get("probe", "grad-total")
    assert dict(probe.options) == {"ord": ("2", "inf")}
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
