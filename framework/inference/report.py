"""A model's test-set report: accuracy, loss, per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Report:
    accuracy: float
    loss: float
    classes: tuple[str, ...]
    matrix: np.ndarray  # [true, predicted] counts

    @property
    def per_class(self) -> dict[str, float]:
        totals = self.matrix.sum(1)
        return {c: float(self.matrix[i, i] / totals[i]) if totals[i] else float("nan")
                for i, c in enumerate(self.classes)}

    def table(self):
        from rich.table import Table

        table = Table("class", "accuracy", "images", title="per-class test accuracy")
        for (name, acc), count in zip(self.per_class.items(), self.matrix.sum(1)):
            table.add_row(name, f"{acc:.2%}", str(int(count)))
        return table


def confusion(logits: Tensor, labels: Tensor, classes: tuple[str, ...]) -> Report:
    """The report of a split's logits against its labels (both on one device)."""
    n = len(classes)
    predictions = logits.argmax(1)
    matrix = torch.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)
    return Report(float((predictions == labels).float().mean()),
                  float(F.cross_entropy(logits, labels)), tuple(classes), matrix.cpu().numpy())
