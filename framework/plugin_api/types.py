"""What a plugin registers: one small frozen dataclass per kind.

A plugin builds one of these and hands it to the ``register`` callback of the matching hook
(see :mod:`cifarx.plugin_api.hookspecs`). Names are unique per kind across all installed packages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .options import Option, schema

if TYPE_CHECKING:  # torch is imported by the plugins that use it, not by `cifarx --help`
    from torch import Tensor, nn

# Where an augmentation runs in a training step, in this order:
#   "pixels"      on float pixels in [0, 1], before normalization (e.g. a flip)
#   "normalize"   turns pixels into the network's input; exactly one per run, and it is saved
#                 inside the exported model so that the model takes pixels in [0, 1]
#   "normalized"  on the network's input, after normalization (e.g. a zero-padded crop)
#   "mix"         on the network's input and the batch's labels, as soft labels (e.g. mixup)
STAGES = ("pixels", "normalize", "normalized", "mix")

# The options a plugin declares, by name: an Option (default, type, choices or range, help),
# or for short a tuple of accepted values (the first is the default) or a plain default value.
# Every kind takes them the same way; see cifarx.options.
Options = Mapping[str, "Option | tuple | Any"]


class _Declared:
    """Turns the ``options`` a plugin wrote into :class:`cifarx.plugin_api.options.Option`
    objects."""

    def __post_init__(self):
        # plain values (``"width": 32``) are accepted but deprecated: the registry warns
        untyped = tuple(name for name, value in self.options.items()
                        if not isinstance(value, (Option, tuple)))
        object.__setattr__(self, "untyped", untyped)
        object.__setattr__(self, "options", schema(self.options))


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
        import torch

        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{split}_images must be uint8 (N, C, H, W), got {images.dtype} "
                                 f"{tuple(images.shape)}")
            if labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must have shape ({images.shape[0]},)")


@dataclass(frozen=True)
class Dataset(_Declared):
    """A dataset: ``load(data_dir, split, **options)`` returns :class:`ImageData`.

    ``split`` is one of ``splits`` (the first is the default) and selects the training images
    (the test set is always the whole test set). ``data_dir`` is where the files live or should
    be downloaded to. ``options`` (set with ``--dataset-opt NAME=VALUE``) reach ``load`` as
    keyword arguments. ``image_shape`` (C, H, W) and ``num_classes`` tell ``cifarx describe``
    what the dataset's images look like without loading them.
    """

    name: str
    load: Callable[..., ImageData]
    splits: tuple[str, ...] = ("all",)
    summary: str = ""
    options: Options = field(default_factory=dict)
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10


@dataclass(frozen=True)
class Augmentation(_Declared):
    """A batched image operation applied during training, on the training device.

    For the ``"pixels"`` and ``"normalized"`` stages, ``apply(images, generator, **options)``
    transforms a float batch (N, C, H, W); draw all randomness from ``generator`` so that runs
    repeat. For the ``"mix"`` stage, ``apply(images, targets, generator, **options)`` also
    receives the batch's labels as soft labels, float (N, num_classes) with rows summing to 1,
    and returns ``(images, targets)``: the loss is the cross-entropy against them. For the
    ``"normalize"`` stage, ``fit(train_images, **options)`` receives the uint8 training images
    and returns the ``nn.Module`` that maps pixels in [0, 1] to the network's input.
    ``options`` are set with ``--aug-opt <name>.<option>=VALUE`` and logged as the params
    ``aug.<name>.<option>``; ``check(**options)``, if given, runs when the run is planned,
    before anything opens, and raises :class:`cifarx.OptionError` for values that cannot go
    together.
    """

    name: str
    stage: str
    apply: Callable[..., Tensor | tuple[Tensor, Tensor]] | None = None
    fit: Callable[..., nn.Module] | None = None
    summary: str = ""
    options: Options = field(default_factory=dict)
    check: Callable[..., None] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"augmentation {self.name!r}: stage must be one of {STAGES}")
        wanted = "fit" if self.stage == "normalize" else "apply"
        if getattr(self, wanted) is None:
            raise ValueError(f"augmentation {self.name!r} in stage {self.stage!r} needs {wanted}=")


@dataclass(frozen=True)
class Architecture(_Declared):
    """A model factory: ``build(num_classes=, in_channels=, image_size=, **options)``.

    The module it returns takes normalized images and returns logits. ``defaults`` may set
    training options this architecture is known to train best with (``lr``, ``optimizer``,
    ``momentum``, ``weight_decay``, ``schedule``); the user's flags still win. ``options`` are
    what ``--arch-opt NAME=VALUE`` sets (see :data:`Options`), e.g.
    ``{"activation": ("relu", "silu")}``; ``build`` receives every one, typed and filled with
    its default, and they are logged as the params ``arch.<name>``.
    """

    name: str
    build: Callable[..., nn.Module]
    summary: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class Probe(_Declared):
    """A training probe: ``attach(model, **options)`` returns a function run every training step.

    ``model`` is the network (after the normalization), ``options`` those the user set with
    ``--probe-opt <probe>.NAME=VALUE``, typed and filled with their defaults (see
    :data:`Options`); ``attach`` raises :class:`cifarx.OptionError` for a value it cannot use
    (a layer the network lacks). The function it
    returns runs after backward and before the optimizer step, and returns metrics as
    ``{"key": scalar tensor}`` (or none, on steps it skips). Keep the tensors on the device:
    the engine batches them to the host and to MLflow, so a probe costs no host sync.
    The function is called once per training step, and what it returns is logged at that
    step (1, 2, ...). ``figure(history)``, if given, receives every metric of the run (the
    probe's and the others': ``train/loss``, ``test/acc``, ...) as
    ``{key: [(step, value), ...]}`` once, at the end of the run (or where it diverged), and
    returns a matplotlib figure, logged as ``figures/<name>.png``.
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
class Attack(_Declared):
    """An adversarial attack: ``build(model, **options)`` returns an ``attack`` function.

    ``attack(images, labels, generator)`` receives a whole batch of float32 pixels in [0, 1] on
    the model's device with their true labels, draws any randomness from ``generator`` (on the
    same device), and returns an :class:`AttackResult`. ``model`` takes pixels in [0, 1] (it
    holds its own normalization), is in eval mode and its parameters do not require gradients.
    ``options`` are set with ``--attack-opt NAME=VALUE`` (some with flags of their own on
    ``cifarx attack``: ``--eps``, ...) and logged as the params ``attack.<name>``; ``build``
    receives every one, typed and filled with its default. An option named ``target`` takes a
    class: the user gives an index or a name, ``build`` receives the index (or ``"next"``).
    """

    name: str
    build: Callable[..., Callable[..., AttackResult]]
    summary: str = ""
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class Executor(_Declared):
    """Where a sweep's trials run: worker processes, a cluster, a scheduler.

    ``check(trials, **options)``, if given, runs in the sweep's process before any run opens
    and raises :class:`cifarx.UserError` (or :class:`cifarx.OptionError` naming an option) for
    what cannot work: a missing package, an address that does not answer, a tracking store the
    workers cannot reach. ``run(trials, on_outcome, **options)`` calls
    :func:`cifarx.studies.trials.run_trial` on every :class:`~cifarx.studies.trials.Trial`
    somewhere, calls ``on_outcome(outcome)`` in the sweep's process as each trial ends (in any
    order), and returns when all have ended. ``trials`` is an iterable: take the next trial only
    when it can start (a worker is free), after reporting the outcome that freed the place, so that
    a search (tpe) chooses each trial knowing every result so far. A trial whose worker dies (killed
    by the OS, a segfault) becomes ``Outcome(trial, "FAILED", error="worker died: ...")`` and the
    others carry on. On KeyboardInterrupt (Ctrl-C), ``run`` stops the trials still running
    (``run_trial`` ends an interrupted run KILLED), stops its workers, and lets the
    KeyboardInterrupt propagate. ``options`` are set with ``--executor-opt NAME=VALUE`` and logged
    with the sweep as the params ``executor.<name>``.
    """

    name: str
    run: Callable[..., None]
    check: Callable[..., None] | None = None
    summary: str = ""
    options: Options = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """Every name that starts with ``prefix``: ``resolve(rest)`` returns the plugin object.

    ``resolve`` raises :class:`cifarx.UserError` when ``rest`` names nothing it knows.
    """

    prefix: str
    resolve: Callable[[str], Any]
    summary: str = ""


@dataclass(frozen=True)
class AnalysisData:
    """What an analysis looks at: N test images chosen per class by ``--seed``, and the split.

    ``images``: float32 pixels in [0, 1] (N, C, H, W) and ``labels`` int64 (N,), on the model's
    device, grouped by class; ``indices``: int64 (N,) on the CPU, their 0-based positions in the
    test split as the dataset orders it (-1 for an image that is not a test image: a
    ``fool-noise`` set's noise). ``test_images`` (uint8) and ``test_labels``: the whole test
    split, on the CPU; ``test_logits``: the model's float32 logits for it, on the CPU, computed
    on first use (by ``predict``) and shared by the run's analyses. ``adversarial``: with
    ``--adversarial``, the adversarial versions of ``images`` (same shape, device and order),
    else None. ``seed``: the command's ``--seed``, for anything random an analysis does.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    classes: tuple[str, ...]
    test_images: Tensor
    test_labels: Tensor
    seed: int = 0
    adversarial: Tensor | None = None
    predict: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def test_logits(self) -> Tensor:
        if self.predict is None:
            raise RuntimeError("AnalysisData.test_logits: no model to predict with yet")
        return self.predict(self.test_images)


@dataclass(frozen=True)
class Findings:
    """What an analysis returns; cifarx logs it into the run.

    ``figure``: a matplotlib figure, logged as ``figures/<analysis>.png``. ``metrics``:
    ``{key: number}``, logged as they are (the built-ins use ``analysis/...`` keys, and the
    confusion matrix ``test/...``). ``files``: ``{artifact path: content}``: for a ``.pt`` path
    a dict of tensors (saved with ``torch.save``; ``torch.load(path, weights_only=True)`` reads
    it back), for ``.json`` a dict or list, for ``.png`` a matplotlib figure, else text.
    ``summary``: one line for the console. ``resolved``: what the analysis chose for options
    left unset (``{"layer": "conv4"}``), logged as their params.
    """

    figure: Any = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    files: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    resolved: Mapping[str, Any] = field(default_factory=dict)  # unset options, as chosen


@dataclass(frozen=True)
class Analysis(_Declared):
    """A look inside a trained model: ``analyze(model, data, **options)`` returns
    :class:`Findings`.

    ``model`` takes pixels in [0, 1] (it holds its normalization) and returns logits; it is in
    eval mode, in float32, on the device of ``data.images``, and its parameters need no
    gradient. Leave it as it is: change a copy. ``data`` is :class:`AnalysisData`. ``options``
    are set with ``--analysis-opt <name>.NAME=VALUE`` and logged as the params
    ``analysis.<name>.<option>``. ``check(model, data, **options)``, if given, runs before any
    run opens (for ``cifarx train --analyze``, on the untrained model) and raises
    :class:`cifarx.OptionError` for a value this model cannot take (a layer it lacks).
    ``adversarial``: whether ``analyze`` looks at ``data.adversarial``; with
    ``--adversarial``, the others are refused.
    """

    name: str
    analyze: Callable[..., Findings]
    summary: str = ""
    options: Options = field(default_factory=dict)
    check: Callable[..., None] | None = None
    adversarial: bool = False


KINDS: dict[str, tuple[str, type]] = {
    "dataset": ("register_datasets", Dataset),
    "augmentation": ("register_augmentations", Augmentation),
    "architecture": ("register_architectures", Architecture),
    "probe": ("register_probes", Probe),
    "attack": ("register_attacks", Attack),
    "executor": ("register_executors", Executor),
    "analysis": ("register_analyses", Analysis),
}
