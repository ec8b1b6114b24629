"""Optimizers and learning-rate schedules, by name: the tables `--optimizer` and `--schedule`
choose from. torch is imported when an optimizer is made, not when the names are read."""

from __future__ import annotations

import math
from typing import Callable

# Chosen by measurement: table1 with flip,crop on train batch #1, 2,000 iterations of 100
# (see the README's "Choosing the defaults"). Architectures may declare their own.
DEFAULTS = {"optimizer": "nesterov", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
            "schedule": "onecycle"}


def _sgd(optim, params, lr, momentum, weight_decay):
    return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _nesterov(optim, params, lr, momentum, weight_decay):
    return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     nesterov=momentum > 0)


# name -> factory(torch.optim, params, lr, momentum, weight_decay); momentum is ignored by the
# optimizers that have none.
OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd,
    "nesterov": _nesterov,
    "adam": lambda optim, params, lr, momentum, wd: optim.Adam(params, lr=lr, weight_decay=wd),
    "adagrad": lambda optim, params, lr, momentum, wd: optim.Adagrad(params, lr=lr, weight_decay=wd),
    "adadelta": lambda optim, params, lr, momentum, wd: optim.Adadelta(params, lr=lr,
                                                                       weight_decay=wd),
    "rmsprop": lambda optim, params, lr, momentum, wd: optim.RMSprop(params, lr=lr,
                                                                     momentum=momentum,
                                                                     weight_decay=wd),
    "muon": lambda optim, params, lr, momentum, wd: _muon(params, lr, momentum, wd),
}


def _muon(params, lr, momentum, weight_decay):
    from .muon import Muon

    return Muon(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _onecycle(iters: int) -> Callable[[int], float]:
    """Linear warm-up for 20% of the run, then linear decay to zero."""
    warm = max(1, iters // 5)
    decay = max(1, iters - warm)  # a run of one step has no decay phase (iters == warm)
    return lambda step: step / warm if step < warm else max(0.0, (iters - step) / decay)


# name -> factory(iters) of the learning-rate multiplier after `step` optimizer steps.
SCHEDULES: dict[str, Callable[[int], Callable[[int], float]]] = {
    "none": lambda iters: lambda step: 1.0,
    # x0.1 at half and at three quarters of the run
    "step": lambda iters: lambda step: 0.1 ** ((step >= iters // 2) + (step >= 3 * iters // 4)),
    "exponential": lambda iters: lambda step: 0.01 ** (step / iters),  # down to 1% at the end
    "cosine": lambda iters: lambda step: 0.5 * (1 + math.cos(math.pi * min(step, iters) / iters)),
    "onecycle": _onecycle,
    "linear": lambda iters: lambda step: max(0.0, 1 - step / iters),  # straight down to zero
}


def make_optimizer(name: str, groups, lr: float, momentum: float, weight_decay: float):
    """The optimizer over parameters, or parameter groups (each with its ``lr``), each split by
    its parameters' ``lr_scale`` (see :func:`scaled`)."""
    import torch

    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups, "lr": lr}]
    return OPTIMIZERS[name](torch.optim, scaled(groups, weight_decay), lr, momentum, weight_decay)


def scaled(groups: list[dict], weight_decay: float) -> list[dict]:
    """Split each group by its parameters' ``lr_scale`` attribute (1 when absent): a scaled
    parameter learns at ``lr * lr_scale`` with weight decay ``weight_decay / lr_scale``, so
    that the decay per step (their product) stays the same. An architecture sets it on
    parameters that need a faster rate than the rest, such as BatchNorm biases (airbench's
    64x)."""
    out = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
        for scale, params in by_scale.items():
            wd = group.get("weight_decay", weight_decay)
            out.append({**group, "params": params, "lr": group["lr"] * scale,
                        "weight_decay": wd / scale})
    return out


def lr_factor(schedule: str, iters: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` optimizer steps."""
    return SCHEDULES[schedule](iters)


def l1_weights(net) -> list:
    """What ``--l1`` penalizes: the weights of the convolutions and linear layers (not their
    biases, nor the normalization layers' scales and shifts), as is usual."""
    from torch import nn

    return [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and m.weight.requires_grad]
