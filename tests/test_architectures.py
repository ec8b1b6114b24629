"""The part-2 architectures: layer counts, shapes, the residual design, and their options."""

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cifarx.cli import app
from cifarx.model import describe
from cifarx.plugins.architectures import (EXTRA_LAYERS, ResidualConv, build_convonly,
                                          build_plain20, build_residual, build_table1)
from cifarx.registry import catalog


def count(net: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def shape_of(conv: nn.Conv2d):
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.stride)


def test_the_part_2_architectures_are_registered_with_their_options():
    cat = catalog()
    for name in ("table1", "convonly", "plain20", "residual"):
        arch = cat.get("architecture", name)
        assert arch.summary
        assert arch.options["activation"].default == "relu"
        assert arch.options["activation"].choices == ("relu", "relu6", "leaky_relu", "elu", "silu")
        assert arch.options["init"].choices == ("default", "he", "xavier")
    assert "timm:*" in cat.names("architecture")


@pytest.mark.parametrize("build", [build_table1, build_convonly, build_plain20, build_residual])
def test_every_net_maps_a_batch_to_ten_logits(build):
    torch.manual_seed(0)
    assert build()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build(num_classes=4)(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_convonly_has_no_fully_connected_layer():
    net = build_convonly()
    assert count(net, nn.Linear) == 0
    kinds = {type(m) for m in net.modules() if next(m.children(), None) is None}
    assert kinds <= {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                     nn.Flatten}
    assert count(net, nn.BatchNorm2d) == 4
    assert net.classifier.kernel_size == (1, 1) and net.classifier.out_channels == 10


def test_plain20_is_convonly_with_20_more_convs_and_no_batchnorm():
    convonly, plain = build_convonly(), build_plain20()
    assert count(plain, nn.Conv2d) == count(convonly, nn.Conv2d) + 20 == 25
    assert count(plain, nn.BatchNorm2d) == 0 and count(plain, nn.BatchNorm1d) == 0
    width = plain.conv1.out_channels
    extra = [m.conv for name, m in plain.named_children() if name.startswith("extra")]
    assert len(extra) == EXTRA_LAYERS == 20
    assert {shape_of(c) for c in extra} == {(width, width, (5, 5), (2, 2), (1, 1))}
    # the original convs keep their shapes; without BatchNorm they get a bias back
    assert [shape_of(c) for c in convs(convonly)] == [shape_of(c) for c in convs(plain)
                                                     if c not in extra]
    assert all(c.bias is not None for c in convs(plain))


def test_plain20_puts_the_extra_layers_after_the_first_pooling_at_16x16():
    rows = describe(build_plain20(), (3, 32, 32))
    names = [r.name for r in rows]
    assert names[:4] == ["conv1", "act1", "pool1", "extra1.conv"]
    assert names.index("extra20.act") + 1 == names.index("conv2")
    extra_shapes = {r.output_shape for r in rows if r.name.startswith("extra")}
    assert extra_shapes == {(32, 16, 16)}


def test_residual_has_the_same_convs_as_plain20_and_no_batchnorm():
    plain, residual = build_plain20(), build_residual()
    assert [shape_of(c) for c in convs(residual)] == [shape_of(c) for c in convs(plain)]
    assert count(residual, nn.BatchNorm2d) == 0
    blocks = [m for m in residual.modules() if isinstance(m, ResidualConv)]
    assert len(blocks) == 20 and all(b.scale.item() == 0 for b in blocks)
    # one learnable scalar per block is all it adds
    assert sum(p.numel() for p in residual.parameters()) == \
        sum(p.numel() for p in plain.parameters()) + 20


def test_residual_blocks_start_as_the_identity():
    torch.manual_seed(0)
    residual = build_residual().eval()
    shallow = nn.Sequential(*[m for name, m in residual.named_children()
                              if not name.startswith("extra")])
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(residual(x), shallow(x))
    with torch.no_grad():
        residual.extra5.scale.fill_(0.5)
    assert not torch.allclose(residual(x), shallow(x))


def first_conv_grad_max(build) -> float:
    torch.manual_seed(0)
    net = build()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    nn.functional.cross_entropy(net(x), y).backward()
    return net.conv1.weight.grad.abs().max().item()


def test_gradients_vanish_in_plain20_and_reach_the_first_conv_in_residual():
    plain, residual = first_conv_grad_max(build_plain20), first_conv_grad_max(build_residual)
    assert plain < 1e-8
    assert residual > 1e3 * plain and residual > 1e-6


@pytest.mark.parametrize("activation, kind", [("relu", nn.ReLU), ("relu6", nn.ReLU6),
                                              ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU),
                                              ("silu", nn.SiLU)])
@pytest.mark.parametrize("build", [build_table1, build_convonly, build_plain20, build_residual])
def test_activation_option_swaps_every_activation(build, activation, kind):
    net = build(activation=activation)
    acts = [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU,
                                                         nn.SiLU))]
    assert acts and all(type(m) is kind for m in acts)


def test_he_and_xavier_init_set_the_weight_scale_and_zero_the_biases():
    torch.manual_seed(0)
    he = build_plain20(init="he").extra1.conv
    fan_in = 32 * 5 * 5
    assert he.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert torch.count_nonzero(he.bias) == 0
    xavier = build_plain20(init="xavier").extra1.conv
    bound = math.sqrt(6 / (fan_in + fan_in))
    assert xavier.weight.abs().max().item() <= bound
    assert xavier.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    default = build_plain20(init="default").extra1.conv
    assert default.weight.abs().max().item() <= 1 / math.sqrt(fan_in)  # PyTorch's own
    assert torch.count_nonzero(default.bias) > 0


def test_table1_keeps_its_shape_and_parameter_count():
    net = build_table1()
    assert sum(p.numel() for p in net.parameters()) == 145_770
    assert count(net, nn.Conv2d) == 3 and count(net, nn.Linear) == 2


def test_describe_shows_the_part_2_nets_and_their_options():
    runner = CliRunner()
    result = runner.invoke(app, ["describe", "plain20", "--arch-opt", "activation=elu"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "extra20.conv" in result.stdout and "ELU" in result.stdout
    assert "667,114" in result.stdout  # 25 convs with biases
    assert "--arch-opt NAME=VALUE" in result.stdout
    assert "relu, relu6, leaky_relu," in result.stdout and "default, he, xavier" in result.stdout
    result = runner.invoke(app, ["describe", "residual", "--arch-opt", "init=orthogonal"])
    assert result.exit_code == 2
    assert "accepted: default, he, xavier" in result.stderr
