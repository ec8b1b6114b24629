"""A training run's options, and the plan: every name looked up and every value checked, with
the defaults filled in, before anything slow happens.

:class:`TrainConfig` is the one declaration of ``cifarx train``'s options: the CLI's flags,
MLproject's parameters and a study file's keys are its fields (a test keeps them in step).
This module imports no torch: ``cifarx --help`` reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UserError
from ..plugin_api import options as opts
from ..plugin_api.types import Architecture, Attack, Augmentation, Dataset, Probe
from .checks import (check_evaluation, check_hyperparameters, check_regularizers,
                     model_selection)
from .optim import DEFAULTS

if TYPE_CHECKING:
    import torch

    from ..plugin_api.registry import Catalog
    from ..plugin_api.types import ImageData

PRECISIONS = ("auto", "fp32", "bf16")
# What a run measures at every evaluation, so what --monitor may follow (test/ ones leak).
ADV_RATIO = 0.5  # with --adv-train: the fraction of each batch replaced by adversarial images

# The flag that sets each kind's options. Single-plugin kinds take NAME=VALUE, multi-plugin
# kinds PLUGIN.NAME=VALUE; the params are <prefix>.NAME and <prefix>.PLUGIN.NAME.
OPTION_FLAGS = {"dataset": ("--dataset-opt", "dataset"), "architecture": ("--arch-opt", "arch"),
                "augmentation": ("--aug-opt", "aug"), "probe": ("--probe-opt", "probe"),
                "attack": ("--attack-opt", "attack"), "executor": ("--executor-opt", "executor"),
                "analysis": ("--analysis-opt", "analysis")}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default" (see :func:`plan`):
    the dataset's first split, the architecture's optimizer settings, else cifarx's.

    The ``*_options`` fields hold what the option flags took, as ``NAME=VALUE`` texts
    (``PLUGIN.NAME=VALUE`` for augmentations and probes).
    """

    arch: str = "table1"
    aug: tuple[str, ...] = ("flip", "crop")
    dataset: str = "cifar10"
    train_split: str | None = None
    data_dir: str | None = None
    iters: int = 2000
    batch_size: int = 100
    eval_every: int = 100
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # of the forward passes
    threads: int | None = None
    probes: tuple[str, ...] = ()
    arch_options: tuple[str, ...] = ()
    aug_options: tuple[str, ...] = ()
    probe_options: tuple[str, ...] = ()
    dataset_options: tuple[str, ...] = ()
    adv_train: str | None = None  # an attack plugin: adversarial images made at each step
    adv_ratio: float | None = None  # the fraction of each batch they replace (ADV_RATIO)
    attack_options: tuple[str, ...] = ()
    adv_data: tuple[str, ...] = ()  # attack run ids (or set.pt files) added to the data
    label_smoothing: float = 0.0  # F.cross_entropy's: the true class's target is 1 - s + s/K
    l1: float = 0.0  # the loss adds l1 * sum |w| over the conv and linear weights
    clip_grad: float | None = None  # the gradient's total L2 norm is clipped to this
    val_split: float | None = None  # training images held out: a count, or a fraction < 1
    early_stop: int | None = None  # patience: evaluations without improvement of monitor
    monitor: str = "val/acc"  # the metric that selects the model (best) and stops early
    keep: str | None = None  # the weights logged: best or last (None: best with early_stop)
    checkpoint_every: int = 0  # iterations between checkpoints (and one at SIGTERM); 0: none
    init_from: str | None = None  # a model whose weights the network starts from
    freeze: tuple[str, ...] = ()  # parameters that do not train: "backbone", glob patterns
    lr_backbone: float | None = None  # the learning rate of all but the head (fine-tuning)
    tta: str = "none"  # test-time views averaged at each evaluation (inference.predict.TTA)
    ema: float | None = None  # evaluate and keep an exponential moving average of the weights
    classes: tuple[str, ...] = ()  # train and test on these classes only (names or numbers)


@dataclass(frozen=True)
class Pipeline:
    """The augmentations of a run, in the order they apply, with their resolved options."""

    pixels: tuple[Augmentation, ...]
    normalize: Augmentation
    normalized: tuple[Augmentation, ...]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by augmentation
    mix: tuple[Augmentation, ...] = ()  # they change the labels too (soft labels)

    @property
    def all(self) -> tuple[Augmentation, ...]:
        return (*self.pixels, self.normalize, *self.normalized, *self.mix)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.all]


@dataclass(frozen=True)
class Plan:
    """A validated run: the config with every default filled in, and the plugins it uses."""

    config: TrainConfig  # with precision resolved to fp32 or bf16
    arch: Architecture
    dataset: Dataset
    pipeline: Pipeline
    probes: tuple[Probe, ...]
    device: torch.device
    arch_options: Mapping[str, Any] = field(default_factory=dict)  # every option, defaults filled
    probe_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by probe
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    attack: Attack | None = None  # --adv-train's
    attack_options: Mapping[str, Any] = field(default_factory=dict)
    adv_per_batch: int = 0  # images of each batch replaced by adversarial ones

    @property
    def selects(self) -> bool:
        """Whether the run follows ``monitor`` (the best evaluation, early stopping)."""
        cfg = self.config
        return cfg.val_split is not None or cfg.early_stop is not None or cfg.keep == "best"

    def warnings(self) -> list[str]:
        cfg = self.config
        if cfg.monitor.startswith("test/") and (cfg.early_stop is not None or cfg.keep == "best"):
            return [f"--monitor {cfg.monitor} selects the model on the test set: its test "
                    "accuracy is optimistic (the test set leaks into training); monitor "
                    "val/acc with --val-split N instead"]
        return []

    def plugins(self) -> list[tuple[str, str]]:
        """(kind, name) of every plugin the run uses."""
        used = [("dataset", self.dataset.name), ("architecture", self.arch.name)]
        used += [("augmentation", a.name) for a in self.pipeline.all]
        used += [("probe", p.name) for p in self.probes]
        return used + ([("attack", self.attack.name)] if self.attack else [])

    def params(self) -> dict[str, Any]:
        """The resolved config, flat, for MLflow params; options as ``arch.<name>``,
        ``aug.<aug>.<name>``, ``probe.<probe>.<name>``, ``dataset.<name>``, ``attack.<name>``
        (unset ones left out). The adversarial params appear only in runs that use them."""
        from .data import resolve_data_dir

        import torch

        flat = asdict(self.config)
        flat["aug"] = ",".join(self.pipeline.names)
        flat["probe"] = ",".join(flat.pop("probes"))
        for key in ("arch_options", "aug_options", "probe_options", "dataset_options",
                    "attack_options"):
            del flat[key]
        flat.update(opts.params("arch", self.arch_options))
        flat.update(opts.params("dataset", self.dataset_options))
        for aug, values in self.pipeline.options.items():
            flat.update(opts.params(f"aug.{aug}", values))
        for probe, values in self.probe_options.items():
            flat.update(opts.params(f"probe.{probe}", values))
        if self.attack is None:
            del flat["adv_train"], flat["adv_ratio"]
        else:
            flat["adv_per_batch"] = self.adv_per_batch
            flat.update(opts.params("attack", self.attack_options))
        if self.config.adv_data:
            flat["adv_data"] = ",".join(self.config.adv_data)
        else:
            del flat["adv_data"]
        for key in ("clip_grad", "val_split", "early_stop", "init_from", "lr_backbone",
                    "ema"):
            if flat[key] is None:
                del flat[key]
        for key in ("freeze", "classes"):
            flat[key] = ",".join(flat[key])
            if not flat[key]:
                del flat[key]
        if not self.selects:
            del flat["monitor"], flat["keep"]
        flat["data_dir"] = str(resolve_data_dir(self.config.data_dir))
        flat["device"] = str(self.device)
        flat["threads"] = self.config.threads or torch.get_num_threads()
        return flat

    def load_data(self) -> ImageData:
        from .data import only_classes, resolve_data_dir

        data = self.dataset.load(resolve_data_dir(self.config.data_dir), self.config.train_split,
                                 **self.dataset_options)
        if self.config.classes:
            data = only_classes(data, self.config.classes)
        self.check_data(data)
        return data

    def data_key(self) -> tuple:
        """What the loaded data depends on: runs with equal keys can share it."""
        from .data import resolve_data_dir

        return (self.dataset.name, self.config.train_split,
                str(resolve_data_dir(self.config.data_dir)), self.config.dataset_options,
                self.config.classes)

    def check_data(self, data: ImageData):
        n = len(data.train_images)
        if self.config.val_split is not None:
            from .validation import holdout_count

            n -= holdout_count(self.config.val_split, n)
        if self.config.batch_size > n:
            held = " left by --val-split" if self.config.val_split is not None else ""
            raise UserError(f"--batch-size {self.config.batch_size} is larger than the "
                            f"{n} training images{held}")


def parse_list(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"flip, crop"`` -> ``("flip", "crop")``, dropping blanks and repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def resolve_plugin_options(kind: str, plugin, texts, label=None) -> dict[str, Any]:
    """One plugin's options from ``NAME=VALUE`` texts, checked, defaults filled.

    ``label(name)`` names the flag that set an option in messages (default: the kind's
    ``--<kind>-opt NAME``; ``cifarx attack`` passes its own flags, ``--eps``)."""
    flag = OPTION_FLAGS[kind][0]
    given = opts.parse_assignments(flag, list(texts), None)[None]
    return opts.resolve(plugin.name, plugin.options, given,
                        label or (lambda name: opts.flag_label(flag, None, name)))


def resolve_many(kind: str, plugins, texts) -> dict[str, dict[str, Any]]:
    """Several plugins' options from ``PLUGIN.NAME=VALUE`` texts, by plugin."""
    flag = OPTION_FLAGS[kind][0]
    given = opts.parse_assignments(flag, list(texts), [p.name for p in plugins])
    return {p.name: opts.resolve(p.name, p.options, given[p.name],
                                 lambda name, p=p: opts.flag_label(flag, p.name, name))
            for p in plugins}


def build_pipeline(catalog: Catalog, names: tuple[str, ...], texts=()) -> Pipeline:
    """Order the named augmentations by stage; ``normalize`` unless a normalization is named.

    Within a stage the order is alphabetical: it never depends on the order the user typed.
    """
    augs = [catalog.get("augmentation", name) for name in names]
    normalizers = [a for a in augs if a.stage == "normalize"]
    if len(normalizers) > 1:
        raise UserError(f"--aug names {len(normalizers)} normalizations "
                        f"({', '.join(a.name for a in normalizers)}); choose one")
    by_stage = lambda stage: tuple(sorted((a for a in augs if a.stage == stage),  # noqa: E731
                                          key=lambda a: a.name))
    normalize = normalizers[0] if normalizers else catalog.get("augmentation", "normalize")
    chosen = (*by_stage("pixels"), normalize, *by_stage("normalized"), *by_stage("mix"))
    options = resolve_many("augmentation", chosen, texts)
    for aug in chosen:  # values that cannot go together, e.g. erasing's area_min > area_max
        if aug.check is not None:
            try:
                aug.check(**options[aug.name])
            except opts.OptionError as exc:
                raise opts.reword(exc, lambda name, a=aug: opts.flag_label(
                    OPTION_FLAGS["augmentation"][0], a.name, name), options[aug.name]) from None
    return Pipeline(pixels=by_stage("pixels"), normalize=normalize,
                    normalized=by_stage("normalized"), options=options, mix=by_stage("mix"))


def adversarial_training(catalog: Catalog, config: TrainConfig
                         ) -> tuple[Attack | None, dict[str, Any], float | None, int]:
    """``--adv-train``, ``--adv-ratio`` and ``--attack-opt`` checked: (the attack, its options
    with the defaults filled, the ratio, the images it replaces in each batch)."""
    if config.adv_train is None:
        for flag, given in (("--adv-ratio", config.adv_ratio is not None),
                            ("--attack-opt", bool(config.attack_options))):
            if given:
                raise UserError(f"{flag} applies to adversarial training; add --adv-train "
                                "ATTACK (fgsm, pgd, ...)")
        return None, {}, None, 0
    attack = catalog.get("attack", config.adv_train)
    ratio = ADV_RATIO if config.adv_ratio is None else config.adv_ratio
    if not 0 < ratio <= 1:
        raise UserError(f"--adv-ratio must be in (0, 1] (the fraction of each batch replaced by "
                        f"adversarial images), got {ratio}")
    per_batch = math.floor(ratio * config.batch_size + 0.5)  # to the nearest, halves up
    if per_batch < 1:
        raise UserError(f"--adv-ratio {ratio:g} of --batch-size {config.batch_size} replaces no "
                        f"image; accepted: at least {1 / config.batch_size:g}")
    chosen = resolve_plugin_options("attack", attack, config.attack_options)
    return attack, chosen, ratio, per_batch


def plan(config: TrainConfig, catalog: Catalog | None = None) -> Plan:
    """Check every name and value, and fill the defaults, before anything slow happens."""
    from ..inference.predict import resolve_precision
    from ..plugin_api.registry import catalog as default_catalog
    from .data import resolve_device

    catalog = catalog or default_catalog()
    arch = catalog.get("architecture", config.arch)
    dataset = catalog.get("dataset", config.dataset)
    split = config.train_split or dataset.splits[0]
    if split not in dataset.splits:
        raise UserError(f"unknown --train-split {split!r} for {dataset.name}; "
                        f"accepted: {', '.join(dataset.splits)}")
    pipeline = build_pipeline(catalog, parse_list(config.aug), config.aug_options)
    probes = tuple(catalog.get("probe", name) for name in parse_list(config.probes))
    arch_options = resolve_plugin_options("architecture", arch, config.arch_options)
    probe_options = resolve_many("probe", probes, config.probe_options)
    dataset_options = resolve_plugin_options("dataset", dataset, config.dataset_options)
    for key in ("iters", "batch_size", "eval_every"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got "
                            f"{getattr(config, key)}")
    filled = {key: getattr(config, key) if getattr(config, key) is not None
              else arch.defaults.get(key, default) for key, default in DEFAULTS.items()}
    check_hyperparameters(filled)
    if config.precision not in PRECISIONS:
        raise UserError(f"unknown precision {config.precision!r}; accepted: "
                        f"{', '.join(PRECISIONS)}")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads must be at least 1, got {config.threads}")
    attack, attack_options, adv_ratio, adv_per_batch = adversarial_training(catalog, config)
    check_regularizers(config)
    check_evaluation(config)
    from .finetune import check as check_finetune  # it imports torch: not at --help

    check_finetune(config.freeze, config.lr_backbone)
    val_split, keep = model_selection(config)
    # The resolved options as texts that plan the same run again (config.json); unset ones
    # (None) are left out, as "target=" would read back as empty text.
    texts = lambda values: tuple(f"{k}={opts.show(v)}" for k, v in values.items()  # noqa: E731
                                 if v is not None)
    nested = lambda by_plugin: tuple(f"{p}.{k}={opts.show(v)}"  # noqa: E731
                                     for p, values in by_plugin.items()
                                     for k, v in values.items() if v is not None)
    resolved = replace(
        config, aug=tuple(pipeline.names), probes=tuple(p.name for p in probes),
        train_split=split, arch_options=texts(arch_options),
        aug_options=nested(pipeline.options), probe_options=nested(probe_options),
        dataset_options=texts(dataset_options), adv_train=attack.name if attack else None,
        adv_ratio=adv_ratio, attack_options=texts(attack_options),
        adv_data=parse_list(config.adv_data), precision=precision, val_split=val_split,
        keep=keep, **filled)
    return Plan(resolved, arch, dataset, pipeline, probes, device, arch_options, probe_options,
                dataset_options, attack, attack_options, adv_per_batch)
