"""Evaluating a saved model on a test set: accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .engine import evaluate
from .errors import UserError
from .plugin_types import ImageData
from .tracking import Run


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


def evaluate_model(model: nn.Module, data: ImageData, device: torch.device,
                   run: Run | None = None) -> Report:
    classes = tuple(getattr(model, "classes", data.classes))
    if len(classes) != len(data.classes):
        raise UserError(f"the model predicts {len(classes)} classes, the dataset has "
                        f"{len(data.classes)}")
    model.to(device)
    loss, acc, predictions = evaluate(model, data.test_images, data.test_labels, device)
    n = len(data.classes)
    pairs = data.test_labels.to(device) * n + predictions
    matrix = torch.bincount(pairs, minlength=n * n).reshape(n, n).cpu().numpy()
    report = Report(float(acc), float(loss), data.classes, matrix)
    if run is not None:
        from .figures import confusion_matrix

        now = int(time.time() * 1000)
        points = [("test/acc", report.accuracy, 0, now), ("test/loss", report.loss, 0, now)]
        points += [(f"test/acc/{name}", value, 0, now) for name, value in report.per_class.items()]
        run.log_points(points)
        run.log_dict({"classes": list(data.classes), "matrix": matrix.tolist()},
                     "confusion_matrix.json")
        run.log_figure(confusion_matrix(matrix, data.classes,
                                        f"test accuracy {report.accuracy:.2%}"),
                       "figures/confusion_matrix.png")
    return report
