"""Built-in architectures."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from cifarx import Architecture, hookimpl


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 5) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def build_table1(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The assignment's Table 1: three 5x5 conv+BN+ReLU+avg-pool blocks, FC 64 + BN + ReLU, FC."""
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i, width in enumerate((32, 32, 64), start=1):
        conv, bn, relu = conv_bn_relu(channels, width)
        layers += [(f"conv{i}", conv), (f"bn{i}", bn), (f"relu{i}", relu),
                   (f"pool{i}", nn.AvgPool2d(2, stride=2))]
        channels = width
    side = image_size // 8
    layers += [("flatten", nn.Flatten()),
               ("fc1", nn.Linear(channels * side * side, 64, bias=False)),
               ("bn_fc1", nn.BatchNorm1d(64)), ("relu_fc1", nn.ReLU(inplace=True)),
               ("fc2", nn.Linear(64, num_classes))]  # softmax lives in the cross-entropy loss
    return nn.Sequential(OrderedDict(layers))


@hookimpl
def register_architectures(register):
    register(Architecture(
        name="table1", build=build_table1,
        summary="assignment Table 1: 3x(conv5x5 32/32/64 + BN + ReLU + avgpool), FC64+BN+ReLU, FC"))
