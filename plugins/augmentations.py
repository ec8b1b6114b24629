"""Built-in augmentations: raw / normalize (the model's input scaling), flip and crop.

A training batch goes: pixels in [0, 1] -> "pixels" stage (flip) -> the "normalize" stage's
module -> "normalized" stage (crop) -> network. The normalize module is saved inside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarx import Augmentation, Option, hookimpl


class Standardize(nn.Module):
    """Per-channel (x - mean) / std, with statistics measured on the training split."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Scale(nn.Module):
    """Multiply by a constant: ``Scale(255)`` gives the raw pixel values 0..255."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def channel_stats(images: Tensor, chunk: int = 5000) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per channel of uint8 images, in [0, 1] units (float64 sums)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.to("cpu", torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() // images.shape[1]
    mean = total / count
    return mean, (squares / count - mean.square()).clamp_min(0).sqrt()


def fit_standardize(train_images: Tensor) -> nn.Module:
    mean, std = channel_stats(train_images)
    return Standardize(mean, std.clamp_min(1e-6))


def fit_raw(train_images: Tensor) -> nn.Module:
    return Scale(255.0)


def random_flip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], 1, 1, 1, generator=generator, device=images.device) < p
    return torch.where(flip, images.flip(-1), images)


def random_crop(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Zero-pad ``pad`` pixels on each side, then cut a random window of the original size.

    It runs after normalization, where zero is the channel mean (or black, with ``raw``).
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # every window: (n, c, 2p+1, 2p+1, h, w), a view
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=images.device)
    # One gather of whole windows: twice as fast as indexing rows and columns separately.
    return windows[torch.arange(n, device=images.device), :, dy, dx]


@hookimpl
def register_augmentations(register):
    register(Augmentation(name="raw", stage="normalize", fit=fit_raw,
                          summary="no normalization: the network sees pixel values 0..255"))
    register(Augmentation(name="normalize", stage="normalize", fit=fit_standardize,
                          summary="zero mean, unit std per channel (training-split statistics); "
                                  "the default"))
    register(Augmentation(
        name="flip", stage="pixels", apply=random_flip,
        options={"p": Option(0.5, float, range="[0, 1]", help="probability of a flip")},
        summary="random horizontal flip, p=0.5, before normalization"))
    register(Augmentation(
        name="crop", stage="normalized", apply=random_crop,
        options={"pad": Option(4, int, range="[0, 16]", help="zero padding on each side")},
        summary="zero-pad (pad=4 px) after normalization, random crop of the original size"))
