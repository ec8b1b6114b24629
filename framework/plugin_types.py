"""What a plugin registers: one small frozen dataclass per kind.

A plugin builds one of these and hands it to the ``register`` callback of the matching hook
(see :mod:`cifarx.hookspecs`). Names are unique per kind across all installed packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

# Where an augmentation runs in a training step, in this order:
#   "pixels"      on float pixels in [0, 1], before normalization (e.g. a flip)
#   "normalize"   turns pixels into the network's input; exactly one per run, and it is saved
#                 inside the exported model so that the model takes pixels in [0, 1]
#   "normalized"  on the network's input, after normalization (e.g. a zero-padded crop)
STAGES = ("pixels", "normalize", "normalized")


@dataclass(frozen=True)
class ImageData:
    """A labelled image dataset, as uint8 tensors of shape (N, C, H, W)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    source: str  # where the files came from (a path or URL), recorded with each run

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{split}_images must be uint8 (N, C, H, W), got {images.dtype} "
                                 f"{tuple(images.shape)}")
            if labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must have shape ({images.shape[0]},)")


@dataclass(frozen=True)
class Dataset:
    """A dataset: ``load(data_dir, split)`` returns :class:`ImageData`.

    ``split`` is one of ``splits`` and selects the training images (the test set is always the
    whole test set). ``data_dir`` is where the files live or should be downloaded to.
    """

    name: str
    load: Callable[[Path, str], ImageData]
    splits: tuple[str, ...] = ("all",)
    summary: str = ""


@dataclass(frozen=True)
class Augmentation:
    """A batched image operation applied during training, on the training device.

    For the ``"pixels"`` and ``"normalized"`` stages, ``apply(images, generator)`` transforms a
    float batch (N, C, H, W); draw all randomness from ``generator`` so that runs repeat.
    For the ``"normalize"`` stage, ``fit(train_images)`` receives the uint8 training images and
    returns the ``nn.Module`` that maps pixels in [0, 1] to the network's input.
    """

    name: str
    stage: str
    apply: Callable[[Tensor, torch.Generator], Tensor] | None = None
    fit: Callable[[Tensor], nn.Module] | None = None
    summary: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"augmentation {self.name!r}: stage must be one of {STAGES}")
        wanted = "fit" if self.stage == "normalize" else "apply"
        if getattr(self, wanted) is None:
            raise ValueError(f"augmentation {self.name!r} in stage {self.stage!r} needs {wanted}=")


@dataclass(frozen=True)
class Architecture:
    """A model factory: ``build(num_classes=, in_channels=, image_size=, **options)``.

    The module it returns takes normalized images and returns logits. ``defaults`` may set
    training options this architecture is known to train best with (``lr``, ``optimizer``,
    ``momentum``, ``weight_decay``, ``schedule``); the user's flags still win.
    """

    name: str
    build: Callable[..., nn.Module]
    summary: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """A training probe: ``attach(model)`` returns a function the engine calls every step.

    That function runs after backward and before the optimizer step, and returns metrics as
    ``{"key": scalar tensor}``. Keep the tensors on the device: the engine batches them to the
    host and to MLflow, so a probe costs no host sync. ``figure(history)``, if given, receives
    every metric of the run as ``{key: [(step, value), ...]}`` at the end and returns a
    matplotlib figure, logged as ``figures/<name>.png``.
    """

    name: str
    attach: Callable[[nn.Module], Callable[[], Mapping[str, Tensor]]]
    summary: str = ""
    figure: Callable[[Mapping[str, list[tuple[int, float]]]], Any] | None = None


@dataclass(frozen=True)
class Attack:
    """An adversarial attack: ``build(model, **options)`` returns ``attack(images, labels)``.

    ``model`` takes pixels in [0, 1] (it holds its own normalization) and is in eval mode;
    ``attack`` returns adversarial images in [0, 1], same shape as ``images``.
    """

    name: str
    build: Callable[..., Callable[[Tensor, Tensor], Tensor]]
    summary: str = ""


@dataclass(frozen=True)
class Family:
    """Every name that starts with ``prefix``: ``resolve(rest)`` returns the plugin object.

    ``resolve`` raises :class:`cifarx.UserError` when ``rest`` names nothing it knows.
    """

    prefix: str
    resolve: Callable[[str], Any]
    summary: str = ""


KINDS: dict[str, tuple[str, type]] = {
    "dataset": ("register_datasets", Dataset),
    "augmentation": ("register_augmentations", Augmentation),
    "architecture": ("register_architectures", Architecture),
    "probe": ("register_probes", Probe),
    "attack": ("register_attacks", Attack),
}
