"""Figures logged with runs (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: dict[str, list[tuple[int, float]]], title: str):
    """Training accuracy and loss per iteration, with the test evaluations marked."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((acc_ax, "acc", "accuracy"), (loss_ax, "loss", "loss")):
        for split, style in (("train", dict(lw=0.8, alpha=0.8)),
                             ("test", dict(marker="o", ms=4, lw=1.5))):
            points = history.get(f"{split}/{metric}", [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=f"{split} {label}", **style)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: np.ndarray, classes: tuple[str, ...], title: str):
    """Rows: true class; columns: predicted class; cells: counts, shaded by row fraction."""
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig
