"""grad-max and grad-norm: values against a hand computation, layer detection, options, figures."""

import io
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarx import OptionError, UserError
from cifarx.plugin_api.registry import catalog
from cifarx.plugins.architectures import build_convonly
from cifarx.plugins.probes import (attach_grad_max, attach_grad_norm, grad_max_figure,
                                   grad_norm_figure)
from cifarx.plugins.timm_models import resolve
from cifarx.training.config import resolve_many


def two_convs(w1: float, w2: tuple[float, float]) -> nn.Sequential:
    """x -> w1 * x -> (w2[0] * ., w2[1] * .): two 1x1 convs on a 1x1 image, two classes."""
    net = nn.Sequential(OrderedDict(c1=nn.Conv2d(1, 1, 1, bias=False),
                                    c2=nn.Conv2d(1, 2, 1, bias=False), flat=nn.Flatten()))
    with torch.no_grad():
        net.c1.weight.fill_(w1)
        net.c2.weight.copy_(torch.tensor(w2).reshape(2, 1, 1, 1))
    return net


def test_grad_max_matches_the_gradient_computed_by_hand():
    x, w1, w2 = 1.5, 0.8, (-0.5, 2.0)
    net = two_convs(w1, w2)
    read = attach_grad_max(net)
    F.cross_entropy(net(torch.tensor([[[[x]]]])), torch.tensor([0])).backward()

    # by hand: h = w1 x, z_k = w2_k h, p = softmax(z), dL/dz_k = p_k - [k == 0]
    h = w1 * x
    z = [w * h for w in w2]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    dz = [p[0] - 1, p[1]]
    dw2 = [d * h for d in dz]  # dL/dw2_k = dz_k h
    dw1 = sum(d * w for d, w in zip(dz, w2)) * x  # dL/dw1 = sum_k dz_k w2_k x

    values = read()
    assert set(values) == {"grad_max/first_conv", "grad_max/last_conv"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values.values())
    assert values["grad_max/first_conv"].item() == pytest.approx(abs(dw1), rel=1e-5)
    assert values["grad_max/last_conv"].item() == pytest.approx(max(map(abs, dw2)), rel=1e-5)


def backward_once(net: nn.Module, size: int = 32):
    torch.manual_seed(0)
    F.cross_entropy(net(torch.randn(4, 3, size, size)), torch.arange(4)).backward()


def test_grad_max_finds_the_first_and_last_conv_or_the_named_layers():
    net = build_convonly()
    read = attach_grad_max(net)
    backward_once(net)
    values = read()
    assert values["grad_max/first_conv"] == net.conv1.weight.grad.abs().max()
    assert values["grad_max/last_conv"] == net.classifier.weight.grad.abs().max()

    named = attach_grad_max(net, first="conv2", last="conv4")()
    assert named["grad_max/first_conv"] == net.conv2.weight.grad.abs().max()
    assert named["grad_max/last_conv"] == net.conv4.weight.grad.abs().max()


def test_grad_max_finds_the_convs_of_a_timm_model():
    net = resolve("test_resnet").build()
    read = attach_grad_max(net)
    backward_once(net)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
    assert read()["grad_max/first_conv"] == first.weight.grad.abs().max()
    assert read()["grad_max/last_conv"] == last.weight.grad.abs().max()


def test_grad_max_skips_a_layer_without_gradient():
    net = build_convonly()
    read = attach_grad_max(net)
    assert read() == {}  # before any backward
    net.conv1.weight.requires_grad_(False)
    backward_once(net)
    assert set(read()) == {"grad_max/last_conv"}


@pytest.mark.parametrize("options, message", [
    (dict(first="conv9"), "the network has no module 'conv9'; its conv "
                          "layers: conv1, conv2, conv3, conv4, classifier"),
    (dict(last="pool1"), "pool1 (AvgPool2d) has no weight"),
])
def test_grad_max_names_what_exists_when_a_layer_is_wrong(options, message):
    with pytest.raises(OptionError) as caught:  # the caller adds the flag: see test_part2
        attach_grad_max(build_convonly(), **options)
    assert caught.value.option == next(iter(options)) and message in caught.value.message


def test_grad_max_on_a_net_without_convs_needs_the_layer_names():
    mlp = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(12, 4), fc2=nn.Linear(4, 2)))
    with pytest.raises(UserError, match="no Conv2d layer; name the layers"):
        attach_grad_max(mlp)
    read = attach_grad_max(mlp, first="fc1", last="fc2")
    F.cross_entropy(mlp(torch.randn(3, 12)), torch.tensor([0, 1, 0])).backward()
    assert read()["grad_max/first_conv"] == mlp.fc1.weight.grad.abs().max()


def test_grad_norm_reports_every_layer_on_its_stride():
    net = build_convonly()
    read = attach_grad_norm(net, stride=3)
    logged = {}
    for step in range(1, 8):
        net.zero_grad()
        backward_once(net)
        values = read()
        if values:
            logged[step] = values
    assert list(logged) == [1, 3, 6]
    assert list(logged[1]) == ["grad_norm/conv1", "grad_norm/conv2", "grad_norm/conv3",
                               "grad_norm/conv4", "grad_norm/classifier"]
    assert logged[6]["grad_norm/conv3"] == torch.linalg.vector_norm(net.conv3.weight.grad)


@pytest.mark.parametrize("stride", ["0", "-5", "ten", "2.5"])
def test_grad_norm_refuses_a_bad_stride(stride):
    probe = catalog().get("probe", "grad-norm")
    with pytest.raises(UserError, match=f"--probe-opt grad-norm.stride={stride}: not accepted by "
                                        r"grad-norm; accepted: a whole number in \[1, inf\)"):
        resolve_many("probe", [probe], [f"grad-norm.stride={stride}"])


def test_probes_are_registered_with_their_options_and_figures():
    cat = catalog()
    grad_max, grad_norm = cat.get("probe", "grad-max"), cat.get("probe", "grad-norm")
    assert {k: o.default for k, o in grad_max.options.items()} == {"first": "", "last": ""}
    assert grad_norm.options["stride"].default == 50 and grad_norm.options["stride"].type is int
    assert grad_max.figure and grad_norm.figure


def test_grad_max_figure_draws_both_curves_on_a_log_scale_and_counts_zeros():
    history = {"grad_max/first_conv": [(1, 1e-9), (2, 0.0), (3, 1e-8)],
               "grad_max/last_conv": [(1, 0.1), (2, 0.2), (3, 0.15)], "train/loss": [(1, 2.0)]}
    ax = grad_max_figure(history).axes[0]
    assert ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["first conv (1 iterations with G = 0 or not finite, not drawn)", "last conv"]
    assert list(ax.lines[0].get_xdata()) == [1, 3]


def test_grad_norm_figure_has_one_line_per_snapshot_across_the_layers_in_depth_order():
    layers = ["conv1", "extra1.conv", "conv2", "classifier"]
    history = {f"grad_norm/{name}": [(step, (depth + 1) * step) for step in (1, 50, 100, 150, 200,
                                                                              250, 300)]
               for depth, name in enumerate(layers)}
    ax = grad_norm_figure(history, snapshots=4).axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.lines] == ["iteration 1", "iteration 100",
                                                       "iteration 200", "iteration 300"]
    assert list(ax.lines[1].get_ydata()) == [100, 200, 300, 400]
    assert [t.get_text() for t in ax.get_xticklabels()] == layers


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_figures_survive_a_dead_or_diverged_net(value):
    """A figure that raised would turn the end of a finished run into a crash."""
    history = {"grad_max/first_conv": [(1, value), (2, value)],
               "grad_max/last_conv": [(1, value), (2, value)],
               "grad_norm/conv1": [(1, value)], "grad_norm/classifier": [(1, value)]}
    for figure in (grad_max_figure(history), grad_norm_figure(history)):
        figure.savefig(io.BytesIO(), format="png")
