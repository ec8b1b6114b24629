"""The validation split and model selection.

``--val-split`` holds out part of the training images, the same share of every class, chosen
by the seed; the run evaluates on them as it does on the test set (``val/acc``, ``val/loss``).
A :class:`Selection` follows the monitored metric over the evaluations: the best one (whose
weights ``--keep best`` keeps) and, with ``--early-stop PATIENCE``, when to stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError

def minimizes(metric: str) -> bool:
    """Loss-like metrics improve downwards."""
    return metric.endswith("loss")


def holdout_count(val_split: float, n: int) -> int:
    """Images ``--val-split`` holds out of ``n``: a count (>= 1), or a fraction of ``n`` (< 1),
    to the nearest image."""
    count = int(val_split) if val_split >= 1 else math.floor(val_split * n + 0.5)
    if count < 1:
        raise UserError(f"--val-split {val_split:g} of {n} training images holds out none; "
                        "accepted: a count >= 1, or a larger fraction")
    if count >= n:
        raise UserError(f"--val-split {val_split:g} holds out {count} of the {n} training "
                        "images, leaving none to train on; accepted: fewer")
    return count


def stratified_split(labels: Tensor, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """(training indices, validation indices), sorted and disjoint: ``count`` indices held out,
    each class's share of them its share of ``labels`` (remainders to the largest fractions),
    drawn at random within the class by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    classes, sizes = labels.unique(return_counts=True)
    quota = sizes.double() * count / len(labels)
    take = quota.floor().long()
    # The images left over by rounding down go to the classes that lost the most by it.
    short = count - int(take.sum())
    take[torch.argsort(quota - take, descending=True, stable=True)[:short]] += 1
    held = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[:k]])
    val = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


@dataclass(frozen=True)
class Split:
    """The training images a run learns from (uint8, as loaded) and those it holds out."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor | None = None
    val_labels: Tensor | None = None


def split(images: Tensor, labels: Tensor, val_split: float | None, seed: int) -> Split:
    """The training split, less the ``--val-split`` images (all of it without one)."""
    if val_split is None:
        return Split(images, labels)
    train, val = stratified_split(labels, holdout_count(val_split, len(labels)), seed)
    return Split(images[train], labels[train], images[val], labels[val])


class Selection:
    """The best evaluation so far by one metric, and the early-stopping rule: stop when the
    metric has not improved for ``patience`` evaluations in a row (None: never stop).

    An evaluation improves when it is strictly better than the best so far; NaN never does.
    """

    def __init__(self, metric: str, patience: int | None = None):
        self.metric, self.patience = metric, patience
        self.minimize = minimizes(metric)
        self.best_step: int | None = None
        self.best_value = math.nan
        self.waited = 0  # evaluations since the best

    def update(self, step: int, value: float) -> bool:
        """Take one evaluation's value; whether it is the new best."""
        better = not math.isnan(value) and (
            self.best_step is None or
            (value < self.best_value if self.minimize else value > self.best_value))
        if better:
            self.best_step, self.best_value, self.waited = step, value, 0
        else:
            self.waited += 1
        return better

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value,
                "waited": self.waited}

    def restore(self, state: dict):
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.waited = state["waited"]

    @property
    def exhausted(self) -> bool:
        """Patience ran out: time to stop."""
        return self.patience is not None and self.waited >= self.patience
