"""The training loop. It knows nothing of MLflow: it emits the metrics it measures to
listeners (the run's tracking, a progress bar), which decide what to do with them.

One training step::

    uint8 images on device --index--> batch --"pixels" augs--> [adversarial] --> normalize -->
    "normalized" augs --> ["mix" augs] --> net --> loss [+ L1] --> backward --> probes -->
    [clip] --> optimizer step --> metrics kept on the device

``["mix" augs]`` (mixup, cutmix) turn the labels into soft labels (N, classes) that the loss
takes as they are; ``train/acc`` then counts a prediction of the dominant (largest) label.

``[adversarial]`` (``--adv-train``) replaces the first ``adv_per_batch`` images of the batch
(a random sample, as the batch is) by the attack's versions of them, made from the model as it
is at that step, in eval mode (:func:`cifarx.inference.adversarial.attack_mode`).

Every ``eval_every`` steps the model is evaluated on the test set and, with ``--val-split``,
on the held-out training images; a :class:`cifarx.training.validation.Selection` follows the
monitored metric, keeps the best evaluation's weights (``--keep best``) and ends the training when
it stops improving (``--early-stop``: :class:`EarlyStop`).

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
from torch import Tensor, nn

from ..errors import Terminated
from ..inference import adversarial, predict as inference, transfer
from ..plugin_api.options import OptionError, flag_label, reword
from ..plugin_api.types import AttackResult, ImageData
from ..tracking.run import MetricLog, Point
from . import finetune, validation
from .config import OPTION_FLAGS, Plan
from .data import BatchSampler, TrainingImages
from .model import Classifier
from .guards import OnSigterm, diverged
from .optim import l1_weights, lr_factor, make_optimizer

FLUSH_EVERY = 25  # steps between metric transfers to the host
DATA_INIT_IMAGES = 5000  # the images init_from_data sees (airbench's whitening: its records')
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


class EarlyStop(Stop):
    """``--early-stop``: the monitored metric stopped improving."""


@dataclass
class Setup:
    """A run's model, initialized, and its probes, attached to the model's network; the
    training images and those ``--val-split`` holds out; the ``--adv-train`` attack, built on
    the model; the ``--adv-data`` images and their labels."""

    model: Classifier
    probes: list[Callable[[], Mapping[str, Tensor]]]
    split: validation.Split
    attack: Callable[..., AttackResult] | None = None
    adv_images: Tensor | None = None  # float32 pixels in [0, 1], on the CPU
    adv_labels: Tensor | None = None
    adv_test_images: int = 0  # the distinct test images the --adv-data sets were made from
    averaged: nn.Module | None = None  # --ema: an AveragedModel of ``model``


@dataclass
class Result:
    model: Classifier
    history: dict[str, list[tuple[int, float]]]
    test_acc: float
    test_loss: float
    seconds: float
    images_per_second: float
    steps: int = 0  # iterations trained: ``iters``, fewer when stopped
    stopped: Stop | None = None  # a listener, or --early-stop, ended the training early
    best: tuple[int, float] | None = None  # the monitored metric's best evaluation: step, value


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
    split = validation.split(data.train_images, data.train_labels, cfg.val_split, cfg.seed)
    net = plugin_call("architecture", None, plan.arch_options, functools.partial(
        plan.arch.build, num_classes=len(data.classes), in_channels=image_shape[0],
        image_size=image_shape[1]))
    normalize = plan.pipeline.normalize
    model = Classifier(plugin_call("augmentation", normalize.name,
                                   plan.pipeline.options[normalize.name], normalize.fit,
                                   split.train_images), net, data.classes)
    model = model.to(plan.device)
    init_from_data(model, split.train_images, plan.device)
    if cfg.init_from:
        finetune.init_from(net, cfg.init_from, tracking_uri)
    finetune.apply(net, cfg.freeze)
    if inference.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    averaged = averaging(model, cfg.ema)  # copied before the probes hook into the model
    probes = [plugin_call("probe", probe.name, plan.probe_options[probe.name], probe.attach,
                          model.net) for probe in plan.probes]
    setup = Setup(model, probes, split, averaged=averaged)
    if plan.attack is not None:
        trial = data.train_images[:ADV_TRIAL].to(plan.device).float().div_(255)
        setup.attack = adversarial.check_training_attack(
            model, plan.attack, dict(plan.attack_options), data.classes, trial,
            data.train_labels[:ADV_TRIAL].to(plan.device), cfg.seed)
    if cfg.adv_data:
        setup.adv_images, setup.adv_labels, setup.adv_test_images = \
            transfer.training_sets(cfg.adv_data, tracking_uri, data.classes, image_shape)
    return setup


def positional(apply: Callable) -> bool:
    """Whether an augmentation takes ``indices`` (the batch's images' positions in the
    training set) and ``epoch`` (the pass over it): the alternating flip does."""
    import inspect

    return "indices" in inspect.signature(apply).parameters


def init_from_data(model: Classifier, train_images: Tensor, device: torch.device):
    """Data-dependent initialization: each module of the network with an ``init_from_data``
    method (airbench's whitening layer) receives the first ``DATA_INIT_IMAGES`` training
    images, normalized as the network sees them, before training (and before ``--init-from``
    weights, which win)."""
    takers = [m for m in model.net.modules() if callable(getattr(m, "init_from_data", None))]
    if takers:
        images = model.normalize(train_images[:DATA_INIT_IMAGES].to(device).float().div(255))
        for module in takers:
            module.init_from_data(images)


@dataclass
class Checkpointing:
    """Where checkpoints go: ``save(state)`` stores one (the runs layer: a run artifact); taken
    every ``every`` iterations (0: only at SIGTERM, which then ends the training after the
    step under way). ``resume``: a checkpoint to continue from, as ``save`` received it."""

    every: int
    save: Callable[[dict], None]
    resume: dict | None = None


def train(plan: Plan, data: ImageData, setup: Setup | None = None,
          listeners: Sequence[Listener] = (), checkpointing: Checkpointing | None = None
          ) -> Result:
    """Train as the plan says; each listener sees every flush of metrics.

    ``setup`` is :func:`assemble`'s result, when the caller built the model first. Raises
    :class:`Diverged` (with the metrics so far as ``history``) when the loss becomes NaN or
    infinite. A listener's :class:`Stop` ends the training after that flush: the result holds
    the metrics so far and the last evaluation's test accuracy and loss. With ``keep`` best,
    the model ends with the best evaluation's weights, and the result has its test metrics.
    With ``checkpointing``, the training state is saved every ``every`` iterations and at
    SIGTERM (then :class:`cifarx.errors.Terminated` is raised), and a ``resume`` checkpoint
    continues where it was taken, to the same result as an uninterrupted training.
    """
    cfg = plan.config
    device = plan.device
    setup = setup if setup is not None else assemble(plan, data)
    model, probes = setup.model, setup.probes
    amp = inference.amp_dtype(cfg.precision)
    groups = finetune.param_groups(model, cfg.lr, cfg.lr_backbone)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, cfg.iters))
    averaged = setup.averaged
    evaluated_model = averaged.module if averaged is not None else model  # what is evaluated

    def emit(points: list[Point]):
        for listener in listeners:
            listener(points)

    metrics = MetricLog(sink=emit)
    split = setup.split
    train_set = TrainingImages(split.train_images, split.train_labels, device,
                               setup.adv_images, setup.adv_labels)
    penalized = l1_weights(model.net) if cfg.l1 else []
    selection = validation.Selection(cfg.monitor, cfg.early_stop) if plan.selects else None
    best_state = None  # --keep best: the weights of the best evaluation so far
    attack, k = setup.attack, plan.adv_per_batch
    generator = torch.Generator(device).manual_seed(cfg.seed)
    next_batch = BatchSampler(len(train_set), cfg.batch_size, generator, device)
    pixel_augs = [(a.apply, plan.pipeline.options[a.name], positional(a.apply))
                  for a in plan.pipeline.pixels]
    normalized_augs = [(a.apply, plan.pipeline.options[a.name], positional(a.apply))
                       for a in plan.pipeline.normalized]
    mix_augs = [(a.apply, plan.pipeline.options[a.name]) for a in plan.pipeline.mix]

    start = time.perf_counter()
    test_loss = test_acc = torch.tensor(float("nan"))
    checked = 0  # train/loss points already checked for NaN and infinity
    stopped: Stop | None = None
    step = first = 0
    earlier = 0.0  # seconds trained before a resume

    def snapshot() -> dict:
        """Everything the next iteration depends on, as tensors and plain values (a file
        that ``torch.load(weights_only=True)`` reads)."""
        return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                "averaged": averaged.state_dict() if averaged is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "sampler": next_batch.state(), "history": metrics.history,
                "checked": checked, "test": [float(test_loss), float(test_acc)],
                "selection": selection.state() if selection else None,
                "best_state": best_state,
                "seconds": earlier + time.perf_counter() - start}

    if checkpointing is not None and checkpointing.resume is not None:
        state = checkpointing.resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        order = state["sampler"]["order"]
        next_batch.restore({**state["sampler"],
                            "order": None if order is None else order.to(device)})
        metrics.history.update({k: [tuple(p) for p in v] for k, v in state["history"].items()})
        checked, first, earlier = state["checked"], state["step"], state["seconds"]
        test_loss, test_acc = (torch.tensor(v) for v in state["test"])
        if selection is not None:
            selection.restore(state["selection"])
        best_state = state["best_state"]
    terminate = OnSigterm() if checkpointing is not None else None

    def flush() -> Stop | None:
        try:
            metrics.flush()
        except Stop as stop:  # the points reached the listeners before it
            return stop
        return None

    try:
        for step in range(first + 1, cfg.iters + 1):
            indices = next_batch()
            x, y = train_set.batch(indices)
            where = {"indices": indices, "epoch": next_batch.epoch}
            for apply, values, wants in pixel_augs:
                x = apply(x, generator, **values, **(where if wants else {}))
            if attack is not None:  # the adversarial images then take the clean ones' path
                adv, fooled = adversarial.perturb(model, attack, x[:k], y[:k], generator)
                x = torch.cat([adv, x[k:]])
            x = model.normalize(x)
            for apply, values, wants in normalized_augs:
                x = apply(x, generator, **values, **(where if wants else {}))
            targets = y  # class indices, or soft labels once a "mix" augmentation ran
            if mix_augs:
                targets = F.one_hot(y, len(data.classes)).float()
                for apply, values in mix_augs:
                    x, targets = apply(x, targets, generator, **values)
                y = targets.argmax(1)  # the dominant label, for train/acc
            if inference.CHANNELS_LAST:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model.net(x)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
            penalty = cfg.l1 * sum(w.abs().sum() for w in penalized) if penalized else None
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            hits = logits.detach().argmax(1) == y
            values = {"train/loss": loss.detach(), "train/acc": hits.float().mean()}
            if attack is not None:
                values["train/adv_acc"] = hits[:k].float().mean()
                values["train/attack_success"] = fooled.float().mean()
            if penalty is not None:
                values["train/l1"] = penalty.detach()
            for read in probes:  # the gradients as backward made them, before any clipping
                values.update(read())
            if cfg.clip_grad is not None:  # the norm before clipping
                values["train/grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(),
                                                                     cfg.clip_grad)
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(model)
            metrics.add(step, values)

            evaluated = step % cfg.eval_every == 0 or step == cfg.iters
            if evaluated:
                test_loss, test_acc, _ = inference.evaluate(evaluated_model, data.test_images,
                                                            data.test_labels, device,
                                                            cfg.precision, cfg.tta)
                metrics.add(step, {"test/loss": test_loss, "test/acc": test_acc})
                if split.val_images is not None:
                    val_loss, val_acc, _ = inference.evaluate(evaluated_model, split.val_images,
                                                              split.val_labels, device,
                                                              cfg.precision, cfg.tta)
                    metrics.add(step, {"val/loss": val_loss, "val/acc": val_acc})
            if evaluated or step % FLUSH_EVERY == 0:
                stopped = flush()
                losses = metrics.history["train/loss"]
                bad = next(((s, v) for s, v in losses[checked:] if not math.isfinite(v)), None)
                checked = len(losses)
                if bad is not None:
                    raise diverged(plan, *bad, metrics.history)
                if evaluated and selection is not None:
                    if selection.update(step, metrics.history[cfg.monitor][-1][1]) \
                            and cfg.keep == "best":
                        best_state = {k: v.detach().clone()
                                      for k, v in evaluated_model.state_dict().items()}
                    if stopped is None and selection.exhausted:
                        stopped = EarlyStop(step, f"early stop: {cfg.monitor} did not improve "
                                                  f"for {cfg.early_stop} evaluations after "
                                                  f"iteration {selection.best_step}")
                if stopped is not None:
                    break
            if checkpointing is not None and (terminate.is_set() or (
                    checkpointing.every and step % checkpointing.every == 0)):
                stopped = flush() or stopped
                checkpointing.save(snapshot())
                if terminate.is_set():
                    raise Terminated()
                if stopped is not None:
                    break
    finally:
        flush()  # what was measured is kept, also when the run fails or is interrupted
        if terminate is not None:
            terminate.restore()
    seconds = earlier + time.perf_counter() - start
    test_acc, test_loss = float(test_acc), float(test_loss)
    best = None
    if selection is not None and selection.best_step is not None:
        best = (selection.best_step, selection.best_value)
        if best_state is not None and selection.best_step != step:
            evaluated_model.load_state_dict(best_state)
            test_acc = dict(metrics.history["test/acc"])[selection.best_step]
            test_loss = dict(metrics.history["test/loss"])[selection.best_step]
    return Result(model=evaluated_model, history=metrics.history, test_acc=test_acc, test_loss=test_loss,
                  seconds=seconds, images_per_second=step * cfg.batch_size / seconds
                  if seconds else 0.0,
                  steps=step, stopped=stopped, best=best)


def averaging(model: Classifier, decay: float | None):
    """``--ema``: a copy of the model whose weights and BatchNorm statistics follow
    ``ema = decay * ema + (1 - decay) * weights`` after each step (the first step copies)."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
