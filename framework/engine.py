"""Training and evaluation.

One training step::

    uint8 images on device --index--> batch --"pixels" augs--> [adversarial] --> normalize -->
    "normalized" augs --> net --> loss --> backward --> probes --> optimizer step --> metrics
    kept on the device

``[adversarial]`` (``--adv-train``) replaces the first ``adv_per_batch`` images of the batch
(a random sample, as the batch is) by the attack's versions of them, made from the model as it
is at that step, in eval mode (:func:`cifarx.adversarial.attack_mode`).

Metrics reach the host (and MLflow) every ``FLUSH_EVERY`` steps and at each evaluation; a NaN or
infinite loss is noticed there and stops the run (:class:`cifarx.errors.Diverged`).
"""

from __future__ import annotations

import math
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, adversarial
from .data import BatchSampler, TrainingImages, resolve_data_dir, resolve_device
from .errors import Diverged, UserError
from .model import Classifier
from .plugin_types import (Architecture, Attack, AttackResult, Augmentation, Dataset, ImageData,
                           Options, Probe)
from .registry import Catalog, catalog as default_catalog
from .tracking import MetricLog, Run, data_digest, git_commit
from .tracking import tracking_uri as resolve_tracking_uri

OPTIMIZERS = ("sgd", "nesterov", "adam", "adagrad", "adadelta", "rmsprop")
SCHEDULES = ("none", "step", "exponential", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")

# Chosen by measurement: table1 with flip,crop on train batch #1, 2,000 iterations of 100
# (see the README's "Defaults" section for the sweep). Architectures may declare their own.
DEFAULTS = {"optimizer": "nesterov", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
            "schedule": "onecycle"}

CHANNELS_LAST = True  # measured: 1.3x to 1.5x over NCHW on the CPU (bench/train_speed.py)
FLUSH_EVERY = 25  # steps between metric transfers to the host
EVAL_BATCH = 500  # measured: 10,000 test images 9% faster than in batches of 1,000 on the CPU
ADV_RATIO = 0.5  # with --adv-train: the fraction of each batch replaced by adversarial images
ADV_TRIAL = 2  # training images an --adv-train attack is tried on before the run opens


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the default" (see :func:`plan`)."""

    arch: str = "table1"
    aug: tuple[str, ...] = ("flip", "crop")
    dataset: str = "cifar10"
    train_split: str = "batch1"
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
    precision: str = "auto"  # of the forward passes; see amp_dtype
    threads: int | None = None
    probes: tuple[str, ...] = ()
    arch_options: tuple[str, ...] = ()  # "name=value", from --arch-opt
    probe_options: tuple[str, ...] = ()  # "probe.name=value", from --probe-opt
    adv_train: str | None = None  # an attack plugin: adversarial images made at each step
    adv_ratio: float | None = None  # the fraction of each batch they replace (ADV_RATIO)
    attack_options: tuple[str, ...] = ()  # "name=value", from --attack-opt
    adv_data: tuple[str, ...] = ()  # attack run ids (or set.pt files) added to the data


@dataclass(frozen=True)
class Pipeline:
    """The augmentations of a run, in the order they apply."""

    pixels: tuple[Augmentation, ...]
    normalize: Augmentation
    normalized: tuple[Augmentation, ...]

    @property
    def names(self) -> list[str]:
        return [a.name for a in (*self.pixels, self.normalize, *self.normalized)]


@dataclass(frozen=True)
class Plan:
    """A validated run: the config with every default filled in, and the plugins it uses."""

    config: TrainConfig  # with precision resolved to fp32 or bf16
    arch: Architecture
    dataset: Dataset
    pipeline: Pipeline
    probes: tuple[Probe, ...]
    device: torch.device
    arch_options: Mapping[str, str] = field(default_factory=dict)  # every option, defaults filled
    probe_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # by probe name
    attack: Attack | None = None  # --adv-train's
    attack_options: Mapping[str, Any] = field(default_factory=dict)  # every option, defaults filled
    adv_per_batch: int = 0  # images of each batch replaced by adversarial ones

    def params(self) -> dict[str, Any]:
        """The resolved config, flat, for MLflow params; options as ``arch.<name>``,
        ``probe.<probe>.<name>`` (unset free-text options left out) and ``attack.<name>``.
        The adversarial params appear only in runs that use them."""
        flat = asdict(self.config)
        flat["aug"] = ",".join(self.pipeline.names)
        flat["probe"] = ",".join(flat.pop("probes"))
        del flat["arch_options"], flat["probe_options"], flat["attack_options"]
        flat.update({f"arch.{name}": value for name, value in self.arch_options.items() if value})
        flat.update({f"probe.{probe}.{name}": value for probe, options in self.probe_options.items()
                     for name, value in options.items() if value})
        if self.attack is None:
            del flat["adv_train"], flat["adv_ratio"]
        else:
            flat["adv_per_batch"] = self.adv_per_batch
            flat.update({f"attack.{name}": value for name, value in self.attack_options.items()})
        if self.config.adv_data:
            flat["adv_data"] = ",".join(self.config.adv_data)
        else:
            del flat["adv_data"]
        flat["data_dir"] = str(resolve_data_dir(self.config.data_dir))
        flat["device"] = str(self.device)
        flat["threads"] = self.config.threads or torch.get_num_threads()
        return flat

    def load_data(self) -> ImageData:
        data = self.dataset.load(resolve_data_dir(self.config.data_dir), self.config.train_split)
        if self.config.batch_size > len(data.train_images):
            raise UserError(f"--batch-size {self.config.batch_size} is larger than the "
                            f"{len(data.train_images)} training images")
        return data


@dataclass
class Result:
    model: Classifier
    history: dict[str, list[tuple[int, float]]]
    test_acc: float
    test_loss: float
    seconds: float
    images_per_second: float
    model_uri: str | None = None


def parse_list(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"flip, crop"`` -> ``("flip", "crop")``, dropping blanks and repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def split_option(flag: str, text: str, example: str) -> tuple[str, str]:
    """``"name=value"`` -> ``("name", "value")``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"{flag} {text!r}: expected name=value, e.g. {flag} {example}")
    return name.strip(), value.strip()


def resolve_options(label: str, owner: str, accepted: Options,
                    given: list[tuple[str, str]]) -> dict[str, str]:
    """Check ``(name, value)`` pairs against a plugin's options; return all, defaults filled.

    ``label`` starts the messages (``"--arch-opt "``, ``"--probe-opt grad-max."``).
    """
    chosen: dict[str, str] = {}
    for name, value in given:
        if name not in accepted:
            raise UserError(f"{label}{name}={value}: {owner} has no option {name!r}; accepted: "
                            f"{', '.join(accepted) or 'none'}")
        if chosen.get(name, value) != value:
            raise UserError(f"{label}{name} is given twice ({chosen[name]!r} and {value!r}); "
                            "give it once")
        values = accepted[name]
        if isinstance(values, tuple) and value not in values:
            raise UserError(f"{label}{name}={value}: not accepted by {owner}; accepted: "
                            f"{', '.join(values)}")
        chosen[name] = value
    return {name: chosen.get(name, values[0] if isinstance(values, tuple) else values)
            for name, values in accepted.items()}


def arch_options(arch: Architecture, texts: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--arch-opt`` values checked against ``arch.options``, every option filled."""
    given = [split_option("--arch-opt", text, "activation=silu") for text in texts]
    return resolve_options("--arch-opt ", arch.name, arch.options, given)


def probe_options(probes: tuple[Probe, ...], texts: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--probe-opt probe.name=value`` values, by probe, every option of every probe filled."""
    given: dict[str, list[tuple[str, str]]] = {probe.name: [] for probe in probes}
    for text in texts:
        key, value = split_option("--probe-opt", text, "grad-norm.stride=50")
        probe, dot, name = key.rpartition(".")
        if not dot or not probe or not name:
            raise UserError(f"--probe-opt {text!r}: expected probe.name=value, "
                            "e.g. --probe-opt grad-norm.stride=50")
        if probe not in given:
            raise UserError(f"--probe-opt {text}: probe {probe!r} is not in --probe "
                            f"({', '.join(given) or 'none given'}); add it there")
        given[probe].append((name, value))
    return {probe.name: resolve_options(f"--probe-opt {probe.name}.", probe.name, probe.options,
                                        given[probe.name]) for probe in probes}


def adversarial_training(catalog: Catalog, config: TrainConfig
                         ) -> tuple[Attack | None, dict[str, Any], float | None, int]:
    """``--adv-train``, ``--adv-ratio`` and ``--attack-opt`` checked: (the attack, its options
    with the defaults filled, the ratio, the images it replaces in each batch).

    The option values are the attack's to check: :func:`prepare` builds it on the model.
    """
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
    given = adversarial.parse_pairs(list(config.attack_options))
    return attack, adversarial.resolve_options(attack, given, flags=()), ratio, per_batch


def build_pipeline(catalog: Catalog, names: tuple[str, ...]) -> Pipeline:
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
    return Pipeline(pixels=by_stage("pixels"),
                    normalize=normalizers[0] if normalizers else catalog.get("augmentation",
                                                                              "normalize"),
                    normalized=by_stage("normalized"))


def plan(config: TrainConfig, catalog: Catalog | None = None) -> Plan:
    """Check every name and value, and fill the defaults, before anything slow happens."""
    catalog = catalog or default_catalog()
    arch = catalog.get("architecture", config.arch)
    dataset = catalog.get("dataset", config.dataset)
    if config.train_split not in dataset.splits:
        raise UserError(f"unknown --train-split {config.train_split!r} for {dataset.name}; "
                        f"accepted: {', '.join(dataset.splits)}")
    pipeline = build_pipeline(catalog, parse_list(config.aug))
    probes = tuple(catalog.get("probe", name) for name in parse_list(config.probes))
    chosen_arch_options = arch_options(arch, config.arch_options)
    chosen_probe_options = probe_options(probes, config.probe_options)
    for key in ("iters", "batch_size", "eval_every"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(config, key)}")
    filled = {key: getattr(config, key) if getattr(config, key) is not None
              else arch.defaults.get(key, default) for key, default in DEFAULTS.items()}
    if filled["optimizer"] not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {filled['optimizer']!r}; accepted: {', '.join(OPTIMIZERS)}")
    if filled["schedule"] not in SCHEDULES:
        raise UserError(f"unknown schedule {filled['schedule']!r}; accepted: {', '.join(SCHEDULES)}")
    if not filled["lr"] > 0:
        raise UserError(f"--lr must be positive, got {filled['lr']}")
    if not 0 <= filled["momentum"] < 1:
        raise UserError(f"--momentum must be in [0, 1), got {filled['momentum']}")
    if filled["weight_decay"] < 0:
        raise UserError(f"--weight-decay must be >= 0, got {filled['weight_decay']}")
    if config.precision not in PRECISIONS:
        raise UserError(f"unknown precision {config.precision!r}; accepted: {', '.join(PRECISIONS)}")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads must be at least 1, got {config.threads}")
    attack, attack_options, adv_ratio, adv_per_batch = adversarial_training(catalog, config)
    resolved = replace(
        config, aug=tuple(a.name for a in augs_in(pipeline)), probes=tuple(p.name for p in probes),
        arch_options=tuple(f"{name}={value}" for name, value in chosen_arch_options.items()),
        probe_options=tuple(f"{probe}.{name}={value}" for probe, options in
                            chosen_probe_options.items() for name, value in options.items()),
        adv_train=attack.name if attack else None, adv_ratio=adv_ratio,
        attack_options=tuple(f"{name}={value}" for name, value in attack_options.items()),
        adv_data=parse_list(config.adv_data), precision=precision, **filled)
    return Plan(resolved, arch, dataset, pipeline, probes, device,
                chosen_arch_options, chosen_probe_options, attack, attack_options, adv_per_batch)


def augs_in(pipeline: Pipeline) -> tuple[Augmentation, ...]:
    return (*pipeline.pixels, pipeline.normalize, *pipeline.normalized)


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=name == "nesterov" and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(name)


def lr_factor(schedule: str, iters: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` optimizer steps."""
    if schedule == "none":
        return lambda step: 1.0
    if schedule == "step":  # x0.1 at half and at three quarters of the run
        return lambda step: 0.1 ** ((step >= iters // 2) + (step >= 3 * iters // 4))
    if schedule == "exponential":  # down to 1% at the end
        return lambda step: 0.01 ** (step / iters)
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, iters) / iters))
    if schedule == "onecycle":  # linear warm-up for 20% of the run, then linear decay to zero
        warm = max(1, iters // 5)
        return lambda step: step / warm if step < warm else max(0.0, (iters - step) / (iters - warm))
    raise ValueError(schedule)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively: CUDA GPUs from Ampere on, and CPUs for
    which oneDNN has bf16 kernels (AVX-512 or AMX on x86)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast where the device computes it natively, else fp32. Measured on
    this project's CPU (AVX-512 BF16): training 1.5x faster, the same test accuracy."""
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                        "use --precision fp32 or auto")
    return name


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None: plain float32."""
    return torch.bfloat16 if precision == "bf16" else None


def folded(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm that directly follows a conv or
    linear layer (in a Sequential) folded into that layer's weights.

    The same function, one pass over the activations less: evaluating 10,000 test images
    took 18% less time on the CPU. The model itself is left as it was.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    copy = deepcopy(model).eval()
    for seq in [m for m in copy.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = seq._modules[first], seq._modules[second]
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                continue
            if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[first] = fuse_conv_bn_eval(layer, bn)
            elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                seq._modules[first] = fuse_linear_bn_eval(layer, bn)
            else:
                continue
            seq._modules[second] = nn.Identity()
    return copy


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, device: torch.device, precision: str = "auto",
            batch_size: int = EVAL_BATCH) -> Tensor:
    """Logits (float32, on ``device``) for uint8 images, in eval mode, in batches."""
    amp = amp_dtype(resolve_precision(precision, device))
    model = folded(model)
    if CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    out = []
    for part in images.split(batch_size):
        x = part.to(device, non_blocking=True).float().div_(255)
        if CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out.append(model(x).float())
    return torch.cat(out)


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device,
             precision: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(loss, accuracy, predictions) on a whole split; loss and accuracy stay on the device."""
    logits = predict(model, images, device, precision)
    labels = labels.to(device)
    predictions = logits.argmax(1)
    return F.cross_entropy(logits, labels), (predictions == labels).float().mean(), predictions


def run_tags(plan: Plan) -> dict[str, str]:
    tags = {"cifarx.arch": plan.config.arch, "cifarx.aug": ",".join(plan.pipeline.names),
            "cifarx.dataset": plan.dataset.name, "cifarx.version": __version__,
            "cifarx.torch": torch.__version__, "cifarx.device": str(plan.device),
            "cifarx.threads": str(plan.config.threads or torch.get_num_threads())}
    if plan.attack is not None:
        tags["cifarx.adv_train"] = plan.attack.name
    if plan.config.adv_data:
        tags["cifarx.adv_data"] = ",".join(plan.config.adv_data)
    if plan.device.type == "cuda":
        tags["cifarx.gpu"] = torch.cuda.get_device_name(plan.device)
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["cifarx.git_commit"] = commit
    return tags


@dataclass
class Prepared:
    """A run's model, initialized, and its probes, attached to the model's network; the
    ``--adv-train`` attack, built on the model; the ``--adv-data`` images and their labels."""

    model: Classifier
    probes: list[Callable[[], Mapping[str, Tensor]]]
    attack: Callable[..., AttackResult] | None = None
    adv_images: Tensor | None = None  # float32 pixels in [0, 1], on the CPU
    adv_labels: Tensor | None = None
    adv_test_images: int = 0  # the distinct test images the --adv-data sets were made from


def prepare(plan: Plan, data: ImageData, tracking_uri: str | None = None) -> Prepared:
    """Build the model, attach the probes and build the attack, seeded; load the --adv-data
    sets from ``tracking_uri`` (default: :func:`cifarx.tracking.tracking_uri`'s).

    Options that only the plugin can check (a weights file, a layer name, an attack's eps) and
    a run id without an adversarial set fail here: call it before opening a run, so that bad
    input opens none.
    """
    cfg = plan.config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    image_shape = tuple(data.train_images.shape[1:])
    net = plan.arch.build(num_classes=len(data.classes), in_channels=image_shape[0],
                          image_size=image_shape[1], **plan.arch_options)
    model = Classifier(plan.pipeline.normalize.fit(data.train_images), net, data.classes)
    model = model.to(plan.device)
    if CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    probes = [probe.attach(model.net, **plan.probe_options.get(probe.name, {}))
              for probe in plan.probes]
    prepared = Prepared(model, probes)
    if plan.attack is not None:
        trial = data.train_images[:ADV_TRIAL].to(plan.device).float().div_(255)
        prepared.attack = adversarial.check_training_attack(
            model, plan.attack, dict(plan.attack_options), data.classes, trial,
            data.train_labels[:ADV_TRIAL].to(plan.device), cfg.seed)
    if cfg.adv_data:
        prepared.adv_images, prepared.adv_labels, prepared.adv_test_images = \
            adversarial.training_sets(cfg.adv_data, resolve_tracking_uri(tracking_uri),
                                      data.classes, image_shape)
    return prepared


def train(plan: Plan, data: ImageData, run: Run | None = None,
          on_update: Callable[[int, Mapping[str, float]], None] | None = None,
          prepared: Prepared | None = None) -> Result:
    """Train as the plan says; log to ``run`` when given. ``on_update`` sees each flush.

    ``prepared`` is :func:`prepare`'s result, when the caller built the model first.
    Raises :class:`Diverged` when the loss becomes NaN or infinite.
    """
    cfg = plan.config
    device = plan.device
    prepared = prepared if prepared is not None else prepare(plan, data)
    model, probes = prepared.model, prepared.probes
    amp = amp_dtype(cfg.precision)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, cfg.iters))

    if run is not None:
        added = {} if prepared.adv_images is None else {
            "adv_data_images": len(prepared.adv_images),
            "adv_data_test_images": prepared.adv_test_images}
        run.log_params({**plan.params(), **added})
        run.log_dataset(f"{plan.dataset.name}-{cfg.train_split}", data.source,
                        data_digest(data.train_images, data.train_labels), context="training")
        run.log_dict(asdict(cfg), "config.json")
    metrics = MetricLog(sink=run.log_points if run is not None else None)

    train_set = TrainingImages(data.train_images, data.train_labels, device,
                               prepared.adv_images, prepared.adv_labels)
    attack, k = prepared.attack, plan.adv_per_batch
    generator = torch.Generator(device).manual_seed(cfg.seed)
    next_batch = BatchSampler(len(train_set), cfg.batch_size, generator, device)

    start = time.perf_counter()
    test_loss = test_acc = torch.tensor(float("nan"))
    checked = 0  # train/loss points already checked for NaN and infinity
    try:
        for step in range(1, cfg.iters + 1):
            x, y = train_set.batch(next_batch())
            for aug in plan.pipeline.pixels:
                x = aug.apply(x, generator)
            if attack is not None:  # the adversarial images then take the clean ones' path
                adv, fooled = adversarial.perturb(model, attack, x[:k], y[:k], generator)
                x = torch.cat([adv, x[k:]])
            x = model.normalize(x)
            for aug in plan.pipeline.normalized:
                x = aug.apply(x, generator)
            if CHANNELS_LAST:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model.net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hits = logits.detach().argmax(1) == y
            values = {"train/loss": loss.detach(), "train/acc": hits.float().mean()}
            if attack is not None:
                values["train/adv_acc"] = hits[:k].float().mean()
                values["train/attack_success"] = fooled.float().mean()
            for read in probes:
                values.update(read())
            optimizer.step()
            schedule.step()
            metrics.add(step, values)

            evaluated = step % cfg.eval_every == 0 or step == cfg.iters
            if evaluated:
                test_loss, test_acc, _ = evaluate(model, data.test_images, data.test_labels, device,
                                                   cfg.precision)
                metrics.add(step, {"test/loss": test_loss, "test/acc": test_acc})
            if evaluated or step % FLUSH_EVERY == 0:
                latest = metrics.flush()
                if on_update is not None:
                    on_update(step, latest)
                losses = metrics.history["train/loss"]
                bad = next(((s, v) for s, v in losses[checked:] if not math.isfinite(v)), None)
                checked = len(losses)
                if bad is not None:
                    raise diverged(plan, *bad, run)
    except Diverged as exc:
        if run is not None:  # the curves up to the divergence are what explains it
            run.set_tags({"cifarx.diverged_at": exc.step})
            log_figures(plan, metrics.history, run,
                        f"{cfg.arch}: diverged at iteration {exc.step} (loss {exc.value})")
        raise
    finally:
        metrics.flush()  # what was measured is kept, also when the run fails or is interrupted
    seconds = time.perf_counter() - start
    result = Result(model=model, history=metrics.history, test_acc=float(test_acc),
                    test_loss=float(test_loss), seconds=seconds,
                    images_per_second=cfg.iters * cfg.batch_size / seconds)
    if run is not None:
        finish(plan, result, run)
    return result


def diverged(plan: Plan, step: int, value: float, run: Run | None) -> Diverged:
    cfg = plan.config
    kept = f"run {run.id} ends FAILED with its metrics up to there; " if run is not None else ""
    advice = "a lower --lr" + (", another --arch-opt init" if "init" in plan.arch_options else "")
    return Diverged(f"training diverged: train/loss is {value} at iteration {step} of {cfg.iters} "
                    f"({cfg.arch}, lr {cfg.lr:g}); {kept}try {advice}, or an architecture with "
                    "normalization or skip connections", step, value)


def log_figures(plan: Plan, history: Mapping[str, list[tuple[int, float]]], run: Run, title: str):
    """The training curves and each probe's figure."""
    from .figures import training_curves

    run.log_figure(training_curves(history, title), "figures/training.png")
    for probe in plan.probes:
        if probe.figure is not None:
            run.log_figure(probe.figure(history), f"figures/{probe.name}.png")


def finish(plan: Plan, result: Result, run: Run):
    """Log the end-of-run summary metrics, the figures and the model."""
    run.log_points([(key, value, plan.config.iters, int(time.time() * 1000)) for key, value in {
        "final/test_acc": result.test_acc, "final/test_loss": result.test_loss,
        "final/train_seconds": result.seconds, "final/images_per_second": result.images_per_second,
    }.items()])
    title = f"{plan.config.arch} ({','.join(plan.pipeline.names)}): final test accuracy " \
            f"{result.test_acc:.2%}"
    log_figures(plan, result.history, run, title)
    model = result.model.to("cpu", memory_format=torch.contiguous_format).eval()
    result.model_uri = run.log_model(model)
