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


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)) and np.isfinite(value)


def _axis_positions(values: list):
    """Where an axis's distinct values go on x: (distinct values, positions, log scale?, step).
    Numeric axes: the values themselves (log when positive and spanning more than a factor of
    10; ``step`` then in log10 units); others, and a lone value: categories 0, 1, ... in
    first-seen order."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1 and all(_is_number(v) for v in distinct):
        distinct = sorted(distinct)
        numbers = np.array(distinct, dtype=float)
        log = bool(numbers.min() > 0 and numbers.max() / numbers.min() > 10)
        scaled = np.log10(numbers) if log else numbers
        gaps = np.diff(scaled)
        step = float(gaps.min()) if len(gaps) else 1.0
        return distinct, list(numbers), log, step
    return distinct, list(range(len(distinct))), False, 1.0


def sweep_axes(summary: list[dict], axes: list[str], metric: str, title: str):
    """One subplot per swept axis: ``metric``'s mean per configuration against the axis's
    values, with its 95% interval (summary's ``{metric}_ci_low/high``; no bar where NaN).
    When other axes are swept too, the configurations sharing the other axes' values form one
    series (a line, named in the legend), the series drawn side by side around each value."""
    axes = list(axes) or [None]  # no axis: the configurations as categories
    rows = [r for r in summary if np.isfinite(r.get(f"{metric}_mean", np.nan))]
    fig, grid = plt.subplots(1, len(axes), figsize=(1 + 4.2 * len(axes), 4), squeeze=False)
    for ax, axis in zip(grid[0], axes):
        if axis is None:
            xs = [str(r["config"]) for r in rows]
            others: list[str] = []
        else:
            xs = [r.get(axis) for r in rows]
            others = [a for a in axes if a != axis]
        distinct, positions, log, step = _axis_positions(xs)
        where = {v: p for v, p in zip(distinct, positions)}
        series: dict[tuple, list] = {}
        for x, r in zip(xs, rows):
            series.setdefault(tuple(r.get(a) for a in others), []).append((x, r))
        width = 0.5 * step  # the series share half of the gap between neighbouring values
        for i, (label, members) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width / max(len(series), 1)
            members.sort(key=lambda m: where[m[0]])
            xpos = []
            for x, _ in members:
                p = where[x]
                xpos.append(p * 10 ** offset if log else p + offset)
            means = np.array([r[f"{metric}_mean"] for _, r in members], dtype=float)
            low = np.array([r.get(f"{metric}_ci_low", np.nan) for _, r in members], dtype=float)
            high = np.array([r.get(f"{metric}_ci_high", np.nan) for _, r in members], dtype=float)
            name = ", ".join(f"{a}={v}" for a, v in zip(others, label)) or None
            (line,) = ax.plot(xpos, means, marker="o", ms=5, lw=1, label=name)
            ok = np.isfinite(low) & np.isfinite(high)
            if ok.any():
                ax.errorbar(np.array(xpos)[ok], means[ok],
                            yerr=[means[ok] - low[ok], high[ok] - means[ok]], fmt="none",
                            ecolor=line.get_color(), elinewidth=1, capsize=0)
        if log:
            ax.set_xscale("log")
        ax.set_xticks(positions, [str(v) for v in distinct],
                      rotation=30 if axis is None else 0, ha="right" if axis is None else "center")
        ax.minorticks_off()
        ax.set_xlabel("configuration" if axis is None else axis)
        ax.set_ylabel(f"{metric} (mean, 95% interval)")
        ax.grid(alpha=0.3)
        if others and len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_curves(curves: list[tuple[str, str, list[tuple[int, float]]]], best: str | None,
                 title: str):
    """Test accuracy against iteration, one line per trial (``(label, config key, points)``):
    every trial thin and grey, the trials of the ``best`` configuration on top, in colour and
    named by their labels."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    grey_named = False
    highlighted = 0
    for label, config, points in curves:
        if not points:
            continue
        steps, values = zip(*points)
        if config == best:
            ax.plot(steps, values, lw=1.8, marker="o", ms=3, zorder=3,
                    color=f"C{highlighted % 10}", label=label)
            highlighted += 1
        else:
            ax.plot(steps, values, lw=0.8, color="0.6", alpha=0.7, zorder=2,
                    label=None if grey_named else "other configurations")
            grey_named = True
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if highlighted or grey_named:
        ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig
