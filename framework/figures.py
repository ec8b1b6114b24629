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
        if metric == "acc" and history.get("train/adv_acc"):  # --adv-train
            steps, values = zip(*history["train/adv_acc"])
            ax.plot(steps, values, label="train accuracy, adversarial images", lw=0.8, alpha=0.8)
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


def _pixels(image) -> np.ndarray:
    """(C, H, W) in [0, 1] -> what imshow takes."""
    array = np.asarray(image, dtype=np.float32).clip(0, 1)
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def adversarial_examples(originals, adversarial, captions: list[tuple[str, str, str]],
                         fooled: list[bool], title: str, per_row: int = 2):
    """For each image: the original, the perturbation (amplified to fill the grey range) and
    the adversarial image, each with its caption; a fooled model's class is in red."""
    n = len(originals)
    rows = max(1, -(-n // per_row))
    height = rows * 1.9 + 0.6  # 0.6 inch for the two-line title
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(3 * per_row * 1.7, height),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        original, adv = np.asarray(originals[i]), np.asarray(adversarial[i])
        delta = adv - original
        peak = float(np.abs(delta).max())
        gain = 0.5 / peak if peak > 0 else 1.0
        panels = (original, 0.5 + delta * gain, adv)
        texts = (captions[i][0], f"{captions[i][1]}, x{gain:.0f}", captions[i][2])
        colors = ("black", "dimgray", "red" if fooled[i] else "black")
        for j, (panel, text, color) in enumerate(zip(panels, texts, colors)):
            ax = axes[i // per_row, (i % per_row) * 3 + j]
            ax.imshow(_pixels(panel), cmap="gray" if panel.shape[0] == 1 else None,
                      interpolation="nearest")
            ax.set_title(text, fontsize=7, color=color)
    fig.suptitle(f"{title}\noriginal | perturbation (amplified) | adversarial", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
    return fig


def transfer_matrix(rates, accuracies, sources: list[str], targets: list[str]):
    """Rows: adversarial sets; columns: target models. Left: transfer rate (share of the
    originals a target got right that it gets wrong after the attack); right: its accuracy on
    the adversarial images."""
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.4 * len(targets), 1.5 + 0.7 * len(sources)),
                             squeeze=False)
    for ax, values, name, cmap in ((axes[0, 0], rates, "transfer rate", "Reds"),
                                   (axes[0, 1], accuracies, "accuracy on adversarial images",
                                    "Blues")):
        grid = np.array(values, dtype=float)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(sources)), sources, fontsize=8)
        ax.set_xlabel("target model")
        ax.set_title(name)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0%}"
                ax.text(j, i, text, ha="center", va="center", fontsize=9,
                        color="white" if grid[i, j] > 0.6 else "black")
    axes[0, 0].set_ylabel("adversarial set")
    fig.tight_layout()
    return fig
