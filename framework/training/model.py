"""The saved model: pixels in [0, 1] -> its own normalization -> the network -> logits.

Keeping the normalization inside means attacks and evaluation work in pixel space, and an
adversarial image is a valid image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    def __init__(self, normalize: nn.Module, net: nn.Module, classes: tuple[str, ...]):
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.classes = tuple(classes)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net(self.normalize(pixels))


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


def describe(net: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """One row per leaf module, in call order, with its output shape for one input image."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in net.named_modules():
        if next(module.children(), None) is not None:
            continue  # only leaves, so parameters are counted once

        def record(mod, args, output, name=name):
            shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else ()
            rows.append(LayerRow(name, type(mod).__name__, shape,
                                 sum(p.numel() for p in mod.parameters(recurse=False))))
        hooks.append(module.register_forward_hook(record))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows
