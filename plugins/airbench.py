"""``airbench``: the network of the CIFAR-10 speed records (Jordan, "94% on CIFAR-10 in 3.29
seconds on a single GPU", 2024), built from cifarx's parts; ``studies/cifar10-94.toml`` is its
recipe.

    whitening 2x2 conv (frozen, set from training patches) -> GELU
    -> 3 x [conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU]  (widths 64, 256, 256)
    -> global max pool -> linear head (no bias) x 1/9

What makes it train in a few epochs, each an option or a documented choice:

- **Whitening.** The first layer's filters are the eigenvectors of the covariance of 2x2
  patches of the (normalized) training images, scaled by 1/sqrt(eigenvalue), with their
  negatives: its output has identity covariance. They are set once, before training, through
  the ``init_from_data`` method that cifarx calls on any module of a network that has one
  (:func:`cifarx.training.loop.assemble`), and never trained; the layer's bias trains.
- **Identity (dirac) init.** Each conv's first ``in_channels`` filters start as the identity,
  the rest as PyTorch's default: at first the signal passes each conv unchanged.
- **BatchNorm** with a fixed scale (only its shift trains), fast statistics (momentum 0.4 in
  PyTorch's convention) and eps 1e-12; the shifts learn ``BIAS_LR`` times faster than the
  filters, the head ``HEAD_LR`` times (``lr_scale``, see :func:`cifarx.training.optim.scaled`).
  The rates are those of the records' Muon recipe (``--optimizer muon --lr 0.24``) rewritten
  for cifarx's mean (not summed) loss over batches of 2,000.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarx import Architecture, Option, UserError, hookimpl

WIDTHS = (64, 256, 256)
BIAS_LR = 442.0  # 0.053 per summed loss x 2,000 images / 0.24, Muon's rate
HEAD_LR = 6.9  # 0.67 x 2,000 x (9/256)^2 / 0.24: the records' head scales its output by 1/256
HEAD_SCALE = 1 / 9
WHITEN_IMAGES = 5000  # the training images whose patches set the whitening (the records')


def shift_faster(param: nn.Parameter, scale: float) -> nn.Parameter:
    param.lr_scale = scale  # read by cifarx.training.optim.scaled
    return param


class Whitening(nn.Module):
    """A frozen conv whose filters whiten ``kernel`` x ``kernel`` patches (and their negatives,
    so that a ReLU-like activation after it loses nothing); its bias trains."""

    def __init__(self, in_channels: int, kernel: int = 2, eps: float = 5e-4):
        super().__init__()
        width = 2 * in_channels * kernel * kernel
        self.conv = nn.Conv2d(in_channels, width, kernel, bias=True)
        self.conv.weight.requires_grad_(False)
        shift_faster(self.conv.bias, BIAS_LR)
        self.eps = eps

    @torch.no_grad()
    def init_from_data(self, images: Tensor):
        """Set the filters from the patches of ``images`` (normalized, N x C x H x W)."""
        c, k = images.shape[1], self.conv.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T.reshape(-1, c, k, k) / (eigenvalues + self.eps).sqrt().view(
            -1, 1, 1, 1)
        self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a scale fixed at 1 and a shift that learns ``BIAS_LR`` times faster."""

    def __init__(self, channels: int, momentum: float):
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)
        shift_faster(self.bias, BIAS_LR)


def conv(in_channels: int, out_channels: int, dirac: bool) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, out_channels, 3, padding="same", bias=False)
    if dirac:
        nn.init.dirac_(layer.weight.data[:in_channels])
    return layer


class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, momentum: float, dirac: bool):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, dirac)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels, momentum)
        self.conv2 = conv(out_channels, out_channels, dirac)
        self.norm2 = BatchNorm(out_channels, momentum)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int],
                 whiten: bool, dirac: bool, bn_momentum: float):
        super().__init__()
        if whiten:
            self.whiten = Whitening(in_channels)
            width = self.whiten.conv.out_channels
        else:  # a trained 3x3 conv in its place, for the ablation
            self.whiten = nn.Conv2d(in_channels, 2 * in_channels * 4, 3, padding=1)
            width = self.whiten.out_channels
        self.act = nn.GELU()
        blocks = []
        for out in widths:
            blocks.append(Block(width, out, bn_momentum, dirac))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes, bias=False)
        with torch.no_grad():  # the records' initial logits: unit-std weights / width
            self.head.weight.mul_(1 / (self.head.weight.std() * width * HEAD_SCALE))
        shift_faster(self.head.weight, HEAD_LR)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(F.adaptive_max_pool2d(x, 1).flatten(1)) * HEAD_SCALE


def build_airbench(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   width1: int = WIDTHS[0], width2: int = WIDTHS[1], width3: int = WIDTHS[2],
                   whiten: bool = True, dirac: bool = True, bn_momentum: float = 0.4
                   ) -> nn.Module:
    if image_size < 9:
        raise UserError(f"--arch airbench needs images of at least 9x9 pixels (three 2x "
                        f"poolings), got {image_size}x{image_size}")
    return AirbenchNet(num_classes, in_channels, (width1, width2, width3), whiten, dirac,
                       bn_momentum)


def width(default: int, which: str) -> Option:
    return Option(default, int, range="[1, 4096]", help=f"channels of the {which} block")


OPTIONS = {
    "width1": width(WIDTHS[0], "first"),
    "width2": width(WIDTHS[1], "second"),
    "width3": width(WIDTHS[2], "third"),
    "whiten": Option(True, bool, help="the first layer whitens 2x2 patches, set from the "
                                      "training images and frozen; false: a trained 3x3 conv"),
    "dirac": Option(True, bool, help="each conv's first in_channels filters start as the "
                                     "identity"),
    "bn_momentum": Option(0.4, float, range="(0, 1]",
                          help="BatchNorm's running-statistics momentum (PyTorch's convention)"),
}


@hookimpl
def register_architectures(register):
    register(Architecture(
        name="airbench", build=build_airbench, options=OPTIONS,
        defaults={"optimizer": "muon", "lr": 0.24, "momentum": 0.85,
                  "weight_decay": 0.004 / 0.24, "schedule": "linear"},
        summary="the CIFAR-10 speed records' net (airbench): whitening 2x2 conv, 3 blocks of "
                "2 conv3x3 + BN + GELU (64-256-256), max pools, linear head; dirac init"))
