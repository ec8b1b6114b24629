"""The training loop. It knows nothing of MLflow: it emits the metrics it measures to
listeners (the run's tracking, a progress bar), which decide what to do with them.

One training step::

    uint8 images on device --index--> batch --"pixels" augs--> [adversarial] --> normalize -->
    "normalized" augs --> net --> loss --> backward --> probes --> optimizer step --> metrics
    kept on the device

``[adversarial]`` (``--adv-train``) replaces the first ``adv_per_batch`` images of the batch
(a random sample, as the batch is) by the attack's versions of them, made from the model as it
is at that step, in eval mode (:func:`cifarx.adversarial.attack_mode`).

Metrics reach the host (and the listeners) every ``FLUSH_EVERY`` steps and at each evaluation;
a NaN or infinite loss is noticed there and stops the run (:class:`cifarx.errors.Diverged`).
A listener that raises :class:`Stop` (a search's pruner: :class:`Pruned`) ends the training
early and cleanly: :func:`train` returns what it measured so far, with ``Result.stopped``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import adversarial, inference, transfer
from .config import OPTION_FLAGS, Plan
from .data import BatchSampler, TrainingImages
from .errors import Diverged
from .model import Classifier
from .optim import lr_factor, make_optimizer
from .options import OptionError, flag_label, reword
from .plugin_types import AttackResult, ImageData
from .tracking import MetricLog, Point

FLUSH_EVERY = 25  # steps between metric transfers to the host
ADV_TRIAL = 2  # training images an --adv-train attack is tried on before the run opens

# Called at each flush with the new points: (key, value, step, timestamp in ms).
Listener = Callable[[list[Point]], None]


class Stop(Exception):
    """Raised by a listener to end the training after this flush, cleanly: :func:`train`
    returns its result so far (``Result.stopped``), the run ends as a finished one."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class Pruned(Stop):
    """A search's pruner stopped a poor trial (its run is tagged ``cifarx.pruned``)."""


@dataclass
class Setup:
    """A run's model, initialized, and its probes, attached to the model's network; the
    ``--adv-train`` attack, built on the model; the ``--adv-data`` images and their labels."""

    model: Classifier
    probes: list[Callable[[], Mapping[str, Tensor]]]
    attack: Callable[..., AttackResult] | None = None
    adv_images: Tensor | None = None  # float32 pixels in [0, 1], on the CPU
    adv_labels: Tensor | None = None
    adv_test_images: int = 0  # the distinct test images the --adv-data sets were made from


@dataclass
class Result:
    model: Classifier
    history: dict[str, list[tuple[int, float]]]
    test_acc: float
    test_loss: float
    seconds: float
    images_per_second: float
    steps: int = 0  # iterations trained: ``iters``, fewer when stopped
    stopped: Stop | None = None  # a listener ended the training early


def plugin_call(kind: str, plugin: str | None, values: Mapping, fn: Callable, *args):
    """Call a plugin function; its :class:`OptionError` becomes a message naming the flag."""
    try:
        return fn(*args, **values)
    except OptionError as exc:
        flag = OPTION_FLAGS[kind][0]
        raise reword(exc, lambda name: flag_label(flag, plugin, name), values) from None


def assemble(plan: Plan, data: ImageData, tracking_uri: str | None = None) -> Setup:
    """Build the model, attach the probes and build the attack, seeded; load the --adv-data
    sets from ``tracking_uri``.

    Options that only the plugin can check (a weights file, a layer name) and a run id without
    an adversarial set fail here: call it before opening a run, so that bad input opens none.
    """
    cfg = plan.config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    image_shape = tuple(data.train_images.shape[1:])
    net = plugin_call("architecture", None, plan.arch_options, functools.partial(
        plan.arch.build, num_classes=len(data.classes), in_channels=image_shape[0],
        image_size=image_shape[1]))
    normalize = plan.pipeline.normalize
    model = Classifier(plugin_call("augmentation", normalize.name,
                                   plan.pipeline.options[normalize.name], normalize.fit,
                                   data.train_images), net, data.classes)
    model = model.to(plan.device)
    if inference.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    probes = [plugin_call("probe", probe.name, plan.probe_options[probe.name], probe.attach,
                          model.net) for probe in plan.probes]
    setup = Setup(model, probes)
    if plan.attack is not None:
        trial = data.train_images[:ADV_TRIAL].to(plan.device).float().div_(255)
        setup.attack = adversarial.check_training_attack(
            model, plan.attack, dict(plan.attack_options), data.classes, trial,
            data.train_labels[:ADV_TRIAL].to(plan.device), cfg.seed)
    if cfg.adv_data:
        setup.adv_images, setup.adv_labels, setup.adv_test_images = \
            transfer.training_sets(cfg.adv_data, tracking_uri, data.classes, image_shape)
    return setup


def train(plan: Plan, data: ImageData, setup: Setup | None = None,
          listeners: Sequence[Listener] = ()) -> Result:
    """Train as the plan says; each listener sees every flush of metrics.

    ``setup`` is :func:`assemble`'s result, when the caller built the model first. Raises
    :class:`Diverged` (with the metrics so far as ``history``) when the loss becomes NaN or
    infinite. A listener's :class:`Stop` ends the training after that flush: the result holds
    the metrics so far and the last evaluation's test accuracy and loss.
    """
    cfg = plan.config
    device = plan.device
    setup = setup if setup is not None else assemble(plan, data)
    model, probes = setup.model, setup.probes
    amp = inference.amp_dtype(cfg.precision)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, cfg.iters))

    def emit(points: list[Point]):
        for listener in listeners:
            listener(points)

    metrics = MetricLog(sink=emit)
    train_set = TrainingImages(data.train_images, data.train_labels, device,
                               setup.adv_images, setup.adv_labels)
    attack, k = setup.attack, plan.adv_per_batch
    generator = torch.Generator(device).manual_seed(cfg.seed)
    next_batch = BatchSampler(len(train_set), cfg.batch_size, generator, device)
    pixel_augs = [(a.apply, plan.pipeline.options[a.name]) for a in plan.pipeline.pixels]
    normalized_augs = [(a.apply, plan.pipeline.options[a.name]) for a in plan.pipeline.normalized]

    start = time.perf_counter()
    test_loss = test_acc = torch.tensor(float("nan"))
    checked = 0  # train/loss points already checked for NaN and infinity
    stopped: Stop | None = None
    step = 0

    def flush() -> Stop | None:
        try:
            metrics.flush()
        except Stop as stop:  # the points reached the listeners before it
            return stop
        return None

    try:
        for step in range(1, cfg.iters + 1):
            x, y = train_set.batch(next_batch())
            for apply, values in pixel_augs:
                x = apply(x, generator, **values)
            if attack is not None:  # the adversarial images then take the clean ones' path
                adv, fooled = adversarial.perturb(model, attack, x[:k], y[:k], generator)
                x = torch.cat([adv, x[k:]])
            x = model.normalize(x)
            for apply, values in normalized_augs:
                x = apply(x, generator, **values)
            if inference.CHANNELS_LAST:
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
                test_loss, test_acc, _ = inference.evaluate(model, data.test_images,
                                                            data.test_labels, device,
                                                            cfg.precision)
                metrics.add(step, {"test/loss": test_loss, "test/acc": test_acc})
            if evaluated or step % FLUSH_EVERY == 0:
                stopped = flush()
                losses = metrics.history["train/loss"]
                bad = next(((s, v) for s, v in losses[checked:] if not math.isfinite(v)), None)
                checked = len(losses)
                if bad is not None:
                    raise diverged(plan, *bad, metrics.history)
                if stopped is not None:
                    break
    finally:
        flush()  # what was measured is kept, also when the run fails or is interrupted
    seconds = time.perf_counter() - start
    return Result(model=model, history=metrics.history, test_acc=float(test_acc),
                  test_loss=float(test_loss), seconds=seconds,
                  images_per_second=step * cfg.batch_size / seconds, steps=step,
                  stopped=stopped)


def diverged(plan: Plan, step: int, value: float, history) -> Diverged:
    cfg = plan.config
    advice = "a lower --lr" + (", another --arch-opt init" if "init" in plan.arch_options else "")
    error = Diverged(f"training diverged: train/loss is {value} at iteration {step} of "
                     f"{cfg.iters} ({cfg.arch}, lr {cfg.lr:g}); try {advice}, or an architecture "
                     "with normalization or skip connections", step, value)
    error.history = history
    return error
