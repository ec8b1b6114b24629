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

# The options a plugin takes on the command line as name=value (``--arch-opt``, ``--probe-opt``),
# passed to it as keyword arguments, always as text:
#   name -> ("a", "b", ...)  only these values are accepted; the first is the default
#   name -> "default"        any text (a path, a layer name, a number) that the plugin checks
#                            itself, raising UserError; "" means "not set"
Options = Mapping[str, "str | tuple[str, ...]"]


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
    ``momentum``, ``weight_decay``, ``schedule``); the user's flags still win. ``options`` are
    the keyword arguments ``build`` takes from ``--arch-opt name=value`` (see :data:`Options`),
    e.g. ``{"activation": ("relu", "silu")}``; ``build`` receives every one, filled with its
    default, and they are logged as the params ``arch.<name>``.
    """

    name: str
    build: Callable[..., nn.Module]
    summary: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """A training probe: ``attach(model, **options)`` returns a function run every training step.

    ``model`` is the network (after the normalization), ``options`` those the user set with
    ``--probe-opt <probe>.name=value``, filled with their defaults (see :data:`Options`);
    ``attach`` raises :class:`cifarx.UserError` for a value it cannot use. The function it
    returns runs after backward and before the optimizer step, and returns metrics as
    ``{"key": scalar tensor}`` (or none, on steps it skips). Keep the tensors on the device:
    the engine batches them to the host and to MLflow, so a probe costs no host sync.
    ``figure(history)``, if given, receives every metric of the run as
    ``{key: [(step, value), ...]}`` at the end and returns a matplotlib figure, logged as
    ``figures/<name>.png``.
    """

    name: str
    attach: Callable[..., Callable[[], Mapping[str, Tensor]]]
    summary: str = ""
    figure: Callable[[Mapping[str, list[tuple[int, float]]]], Any] | None = None
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns for a batch of N images.

    ``images``: the adversarial images, float32 in [0, 1], shaped like the input.
    ``steps``: gradient steps spent on each image, shape (N,).
    ``success``: whether the attack reached its own goal on each image, shape (N,). An image
    that failed stays in the result: it is reported, never dropped.
    ``targets``: the class each image was pushed toward, for a targeted attack.
    ``start``: the images the attack started from, when they are not its input (random noise).
    """

    images: Tensor
    steps: Tensor
    success: Tensor
    targets: Tensor | None = None
    start: Tensor | None = None

    def __post_init__(self):
        n = self.images.shape[:1]
        for name in ("steps", "success", "targets"):
            value = getattr(self, name)
            if value is not None and value.shape != n:
                raise ValueError(f"AttackResult.{name} must have shape ({n[0]},), got "
                                 f"{tuple(value.shape)}")
        if self.start is not None and self.start.shape != self.images.shape:
            raise ValueError("AttackResult.start must have the shape of AttackResult.images")


@dataclass(frozen=True)
class Attack:
    """An adversarial attack: ``build(model, **options)`` returns an ``attack`` function.

    ``attack(images, labels, generator)`` receives a whole batch of float32 pixels in [0, 1] on
    the model's device with their true labels, draws any randomness from ``generator`` (on the
    same device), and returns an :class:`AttackResult`. ``model`` takes pixels in [0, 1] (it
    holds its own normalization), is in eval mode and its parameters do not require gradients.
    ``build``'s keyword arguments are the attack's options, their defaults the attack's
    defaults; it raises :class:`cifarx.UserError` for a value out of range.
    """

    name: str
    build: Callable[..., Callable[[Tensor, Tensor, torch.Generator], AttackResult]]
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
