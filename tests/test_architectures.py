"""The built-in architectures: layer counts, shapes, the residual design, their options
(activation, init, dropout, batchnorm), and 1-channel 28x28 inputs."""

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cifarx import UserError
from cifarx.cli import app
from cifarx.plugin_api.registry import catalog
from cifarx.plugins.architectures import (EXTRA_LAYERS, ResidualConv, build_convonly,
                                          build_plain20, build_residual, build_table1)
from cifarx.plugins.timm_models import resolve as resolve_timm
from cifarx.training.config import resolve_plugin_options
from cifarx.training.model import describe


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


BUILDS = [build_table1, build_convonly, build_plain20, build_residual]


@pytest.mark.parametrize("build", BUILDS + [lambda **kw: resolve_timm("test_resnet").build(**kw)])
def test_one_channel_28x28_images_go_through_every_net(build):
    torch.manual_seed(0)
    net = build(num_classes=10, in_channels=1, image_size=28)
    logits = net(torch.randn(4, 1, 28, 28))
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("attack, texts", [("ifgsm", ["max_steps=5"]), ("fgsm", []),
                                           ("pgd", ["steps=3"])])
def test_the_attacks_take_one_channel_images(attack, texts):
    torch.manual_seed(0)
    model = build_table1(in_channels=1, image_size=28).eval().requires_grad_(False)
    images = torch.rand(6, 1, 28, 28)
    labels = model(images).argmax(1)
    plugin = catalog().get("attack", attack)
    result = plugin.build(model, **resolve_plugin_options("attack", plugin, texts))(
        images, labels, torch.Generator())
    assert result.images.shape == images.shape
    assert result.images.min() >= 0 and result.images.max() <= 1


@pytest.mark.parametrize("build, before", [(build_table1, "fc2"), (build_convonly, "classifier"),
                                           (build_plain20, "classifier"),
                                           (build_residual, "classifier")])
def test_dropout_goes_right_before_the_last_layer_and_only_when_asked(build, before):
    assert count(build(), nn.Dropout) == 0  # the default net has no dropout layer at all
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    dropped = build(dropout=0.5)
    names = [name for name, _ in dropped.named_children()]
    assert names[names.index("dropout") + 1] == before and dropped.dropout.p == 0.5
    assert names[:names.index("dropout")] + names[names.index("dropout") + 1:] == \
        [name for name, _ in plain.named_children()]
    # the same parameters, drawn the same way: in eval mode the nets agree
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 dropped.state_dict().values()))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(plain.eval()(x), dropped.eval()(x))
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # in training it drops


@pytest.mark.parametrize("build, bn", [(build_table1, 4), (build_convonly, 4)])
def test_batchnorm_false_removes_every_batchnorm_and_gives_the_biases_back(build, bn):
    with_bn, without = build(), build(batchnorm=False)
    assert count(with_bn, nn.BatchNorm2d) + count(with_bn, nn.BatchNorm1d) == bn
    assert count(without, nn.BatchNorm2d) + count(without, nn.BatchNorm1d) == 0
    layers = [m for m in without.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(m.bias is not None for m in layers)
    assert [shape_of(c) for c in convs(with_bn)] == [shape_of(c) for c in convs(without)]
    assert without(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_only_table1_and_convonly_take_batchnorm_and_every_net_takes_dropout():
    cat = catalog()
    for name in ("table1", "convonly", "plain20", "residual", "timm:resnet18"):
        arch = cat.get("architecture", name)
        assert arch.options["dropout"].default == 0.0 and arch.options["dropout"].range == "[0, 1)"
        assert ("batchnorm" in arch.options) == (name in ("table1", "convonly"))
    with pytest.raises(UserError, match="plain20 has no option 'batchnorm'; accepted: activation, "
                                        "init, dropout"):
        resolve_plugin_options("architecture", cat.get("architecture", "plain20"),
                               ["batchnorm=false"])
    with pytest.raises(UserError, match=r"--arch-opt dropout=1: not accepted by table1; accepted: "
                                        r"a number .* in \[0, 1\)"):
        resolve_plugin_options("architecture", cat.get("architecture", "table1"), ["dropout=1"])
    options = resolve_plugin_options("architecture", cat.get("architecture", "convonly"),
                                     ["batchnorm=false", "dropout=0.3"])
    assert options == {"activation": "relu", "init": "default", "dropout": 0.3,
                       "batchnorm": False}


def test_timm_dropout_is_its_drop_rate():
    assert resolve_timm("test_resnet").build().drop_rate == 0.0
    assert resolve_timm("test_resnet").build(dropout=0.25).drop_rate == 0.25


def test_describe_says_where_the_dropout_goes():
    result = CliRunner().invoke(app, ["describe", "table1", "--arch-opt", "dropout=0.5",
                                      "--arch-opt", "batchnorm=false"],
                                 env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "Dropout" in result.stdout and "bn1" not in result.stdout
    assert "dropout probability on fc2's input" in result.stdout
    assert "false: no BatchNorm after conv1-3 and fc1" in result.stdout
