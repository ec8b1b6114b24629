"""Built-in architectures: the assignment's Table 1 (part 1) and the part-2 nets.

Part 2 builds three nets on one skeleton, so that they differ only where the assignment says:

- ``convonly``: conv, BatchNorm, activation and average pooling only; a 1x1 conv gives the class
  scores and a global average pool reduces them to logits (no fully connected layer).
- ``plain20``: ``convonly`` with 20 extra 5x5 convs at 16x16, after the first pooling, and every
  BatchNorm removed: the vanishing-gradient net.
- ``residual``: ``plain20`` with an identity skip around each extra conv, scaled from zero.

Every conv net takes ``--arch-opt activation=...``, ``init=...`` and ``dropout=P`` (before the
last layer); ``table1`` and ``convonly`` also ``batchnorm=false``. The defaults build the nets of
the assignment unchanged: no dropout layer at all, the same parameters in the same order.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from cifarx import Architecture, Option, hookimpl

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}
INITS = ("default", "he", "xavier")
CONV_OPTIONS = {
    "activation": Option("relu", choices=tuple(ACTIVATIONS), help="the activation after each conv"),
    "init": Option("default", choices=INITS,
                   help="weight init: PyTorch's default, he (Kaiming normal) or xavier"),
}


def dropout_option(where: str) -> Option:
    # After every BatchNorm: dropout in front of one would make it normalize with statistics
    # that change between training and evaluation (the "variance shift").
    return Option(0.0, float, range="[0, 1)",
                  help=f"dropout probability {where}, in training only; 0: no dropout layer")


def batchnorm_option(where: str) -> Option:
    return Option(True, bool, help=f"false: no BatchNorm {where}; the layers it followed get "
                                   "their biases back")


TABLE1_OPTIONS = {**CONV_OPTIONS,
                  "dropout": dropout_option("on fc2's input (after act_fc1)"),
                  "batchnorm": batchnorm_option("after conv1-3 and fc1")}
CONVONLY_OPTIONS = {**CONV_OPTIONS,
                    "dropout": dropout_option("on the classifier's input (after act4)"),
                    "batchnorm": batchnorm_option("after conv1-4")}
DEEP_OPTIONS = {**CONV_OPTIONS, "dropout": dropout_option("on the classifier's input (after act4)")}

CONVONLY_WIDTHS = (32, 32, 64, 128)  # conv1..conv4
EXTRA_LAYERS = 20


def init_weights(net: nn.Module, init: str, activation: str) -> nn.Module:
    """Re-initialize every conv and linear weight, and zero their biases, unless ``default``.

    ``he`` keeps the activations' variance through ReLU-like layers (Kaiming normal, fan in);
    ``xavier`` keeps it through linear ones (Glorot uniform). ``default`` is PyTorch's own
    (Kaiming uniform with a=sqrt(5), which shrinks the signal at each layer).
    """
    if init == "default":
        return net
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if init == "he":
                leaky = activation == "leaky_relu"
                nn.init.kaiming_normal_(module.weight, a=0.01 if leaky else 0, mode="fan_in",
                                        nonlinearity="leaky_relu" if leaky else "relu")
            elif init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                raise ValueError(f"unknown init {init!r}")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def dropout_layer(p: float) -> list[tuple[str, nn.Module]]:
    """The dropout layer, or none at p = 0: the default net keeps its layers and its outputs."""
    return [("dropout", nn.Dropout(p))] if p > 0 else []


def build_table1(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 activation: str = "relu", init: str = "default", dropout: float = 0.0,
                 batchnorm: bool = True) -> nn.Module:
    """The assignment's Table 1: three 5x5 conv+BN+ReLU+avg-pool blocks, FC 64 + BN + ReLU, FC."""
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i, width in enumerate((32, 32, 64), start=1):
        layers.append((f"conv{i}", nn.Conv2d(channels, width, 5, padding=2, bias=not batchnorm)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(width)))
        layers += [(f"act{i}", ACTIVATIONS[activation]()), (f"pool{i}", nn.AvgPool2d(2, stride=2))]
        channels = width
    side = image_size // 8
    layers += [("flatten", nn.Flatten()),
               ("fc1", nn.Linear(channels * side * side, 64, bias=not batchnorm))]
    if batchnorm:
        layers.append(("bn_fc1", nn.BatchNorm1d(64)))
    layers += [("act_fc1", ACTIVATIONS[activation]()), *dropout_layer(dropout),
               ("fc2", nn.Linear(64, num_classes))]  # softmax lives in the cross-entropy loss
    return init_weights(nn.Sequential(OrderedDict(layers)), init, activation)


class PlainConv(nn.Module):
    """One extra layer of plain20: act(conv(x)), 5x5, padding 2, stride 1, channels kept."""

    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 5, padding=2)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class ResidualConv(PlainConv):
    """The same layer with an identity skip: x + scale * act(conv(x)), ``scale`` starting at 0.

    The skip carries the signal forward and the gradient back past every conv, whatever the
    conv's weights. Without BatchNorm the sum's variance would grow with each of the 20 blocks
    (the naive ``x + relu(conv(x))`` explodes); a learnable scale starting at zero makes each
    block the identity at first, so the deep net starts as the shallow ``convonly`` and learns
    how much of each branch to add (ReZero, Bachlechner et al. 2020; SkipInit, De and Smith
    2020). The conv itself gets its gradient as soon as ``scale`` leaves zero, after step 1.
    """

    def __init__(self, channels: int, activation: str):
        super().__init__(channels, activation)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.act(self.conv(x))


def conv_net(num_classes: int, in_channels: int, activation: str, init: str,
             batchnorm: bool = True, extra: type[PlainConv] | None = None,
             dropout: float = 0.0) -> nn.Sequential:
    """The part-2 skeleton: conv1..conv4 (5x5, 5x5, 5x5, 3x3), average pooling after the first
    three, then a 1x1 conv to the class scores and a global average pool.

    ``batchnorm`` puts a BatchNorm after each of conv1..conv4 (the convs then have no bias);
    ``extra`` inserts ``EXTRA_LAYERS`` such layers after the first pooling, as wide as conv1;
    ``dropout`` > 0 drops features in front of the classifier.
    """
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i, width in enumerate(CONVONLY_WIDTHS, start=1):
        kernel = 3 if i == len(CONVONLY_WIDTHS) else 5
        layers.append((f"conv{i}", nn.Conv2d(channels, width, kernel, padding=kernel // 2,
                                             bias=not batchnorm)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(width)))
        layers.append((f"act{i}", ACTIVATIONS[activation]()))
        if i < len(CONVONLY_WIDTHS):
            layers.append((f"pool{i}", nn.AvgPool2d(2, stride=2)))
        if i == 1 and extra is not None:
            layers += [(f"extra{j}", extra(width, activation)) for j in range(1, EXTRA_LAYERS + 1)]
        channels = width
    layers += [*dropout_layer(dropout),
               ("classifier", nn.Conv2d(channels, num_classes, 1)),  # feeds the softmax
               ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return init_weights(nn.Sequential(OrderedDict(layers)), init, activation)


def build_convonly(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   activation: str = "relu", init: str = "default", dropout: float = 0.0,
                   batchnorm: bool = True) -> nn.Module:
    return conv_net(num_classes, in_channels, activation, init, batchnorm=batchnorm,
                    dropout=dropout)


def build_plain20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                  activation: str = "relu", init: str = "default",
                  dropout: float = 0.0) -> nn.Module:
    return conv_net(num_classes, in_channels, activation, init, batchnorm=False, extra=PlainConv,
                    dropout=dropout)


def build_residual(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   activation: str = "relu", init: str = "default",
                   dropout: float = 0.0) -> nn.Module:
    return conv_net(num_classes, in_channels, activation, init, batchnorm=False,
                    extra=ResidualConv, dropout=dropout)


def _widths() -> str:
    return "-".join(map(str, CONVONLY_WIDTHS))


@hookimpl
def register_architectures(register):
    register(Architecture(
        name="table1", build=build_table1, options=TABLE1_OPTIONS,
        summary="assignment Table 1: 3x(conv5x5 32/32/64 + BN + ReLU + avgpool), FC64+BN+ReLU, FC"))
    register(Architecture(
        name="convonly", build=build_convonly, options=CONVONLY_OPTIONS,
        summary=f"conv-only (part 2.1): conv {_widths()} (5x5, 5x5, 5x5, 3x3) each + BN + ReLU, "
                "avgpool after the first three, 1x1 conv to the classes, global average pool"))
    register(Architecture(
        name="plain20", build=build_plain20, options=DEEP_OPTIONS,
        summary=f"convonly + {EXTRA_LAYERS} conv5x5 32 + ReLU after pool1 (at 16x16), no BatchNorm "
                "(part 2.3: gradients vanish)"))
    register(Architecture(
        name="residual", build=build_residual, options=DEEP_OPTIONS,
        # Without BatchNorm the main convs cannot take the shared peak rate: at lr 0.1 a run
        # diverged (NaN) right after the one-cycle peak, at iteration 451 of 2,000.
        defaults={"lr": 0.02},
        summary="plain20 with identity skips, x + s*relu(conv(x)) with a learnable s starting at "
                "0 (ReZero): each block starts as the identity, so signal and gradient pass all "
                "20 (part 2.4)"))
