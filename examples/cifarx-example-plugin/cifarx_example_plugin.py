"""An example cifarx plugin package: one architecture and one augmentation.

Install it (``pip install examples/cifarx-example-plugin``), then::

    cifarx plugins                      # lists tiny and cutout, package cifarx-example-plugin
    cifarx train --arch tiny --aug flip,crop,cutout
"""

import torch
from torch import nn

from cifarx import Architecture, Augmentation, hookimpl


def build_tiny(num_classes=10, in_channels=3, image_size=32):
    """Two conv layers and a linear head: trains in seconds, for trying things out."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes))


def cutout(images, generator, size=8):
    """Zero a random size x size square of each image (after normalization: the mean colour)."""
    n, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (n, 1, 1), generator=generator, device=images.device)
    left = torch.randint(0, w - size + 1, (n, 1, 1), generator=generator, device=images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside[:, None], 0.0)


@hookimpl
def register_architectures(register):
    register(Architecture(name="tiny", build=build_tiny,
                          summary="two 3x3 convs and a linear head (example plugin)",
                          defaults={"lr": 0.1}))


@hookimpl
def register_augmentations(register):
    register(Augmentation(name="cutout", stage="normalized", apply=cutout,
                          summary="zero a random 8x8 square after normalization (example plugin)"))
