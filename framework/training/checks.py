"""The training options checked one at a time, before anything runs: each bad value is one
line naming its flag and what is accepted (:func:`cifarx.training.config.plan` calls these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from .config import TrainConfig

KEEPS = ("best", "last")  # --keep: the weights of the best evaluation, or the last ones
MONITORS = ("val/acc", "val/loss", "test/acc", "test/loss")
TTA = ("none", "flip", "flip-translate")  # --tta (see cifarx.inference.predict.with_tta)


def check_evaluation(config: "TrainConfig"):
    if config.tta not in TTA:
        raise UserError(f"--tta {config.tta}: accepted: {', '.join(TTA)}")
    if config.ema is not None and not 0 < config.ema < 1:
        raise UserError(f"--ema must be a decay in (0, 1), such as 0.99, got {config.ema}")


def check_regularizers(config: "TrainConfig"):
    if not 0 <= config.label_smoothing <= 1:
        raise UserError(f"--label-smoothing must be in [0, 1], got {config.label_smoothing}")
    if config.l1 < 0:
        raise UserError(f"--l1 must be >= 0, got {config.l1}")
    if config.clip_grad is not None and not config.clip_grad > 0:
        raise UserError(f"--clip-grad must be positive (the largest gradient norm), got "
                        f"{config.clip_grad}")


def model_selection(config: "TrainConfig") -> tuple[float | int | None, str]:
    """``--val-split``, ``--early-stop``, ``--monitor`` and ``--keep`` checked: (the split, a
    count as a whole number, and the weights kept)."""
    held = config.val_split
    if held is not None:
        if not (0 < held < 1 or held >= 1 and held == int(held)):
            raise UserError(f"--val-split must be a number of images (a whole number >= 1) or a "
                            f"fraction in (0, 1), got {held:g}")
        held = int(held) if held >= 1 else held
    if config.early_stop is not None and config.early_stop < 1:
        raise UserError(f"--early-stop must be at least 1 (evaluations without improvement), "
                        f"got {config.early_stop}")
    keep = config.keep or ("best" if config.early_stop is not None else "last")
    if keep not in KEEPS:
        raise UserError(f"unknown --keep {keep!r}; accepted: {', '.join(KEEPS)}")
    if config.monitor not in MONITORS:
        raise UserError(f"unknown --monitor {config.monitor!r}; accepted: "
                        f"{', '.join(MONITORS)} (measured at every evaluation)")
    if config.monitor.startswith("val/") and held is None:
        for flag, used in (("--early-stop", config.early_stop is not None),
                           ("--keep best", keep == "best")):
            if used:
                raise UserError(f"{flag} follows --monitor {config.monitor}, which needs a "
                                "validation split: add --val-split N (images, or a fraction "
                                "such as 0.1)")
    return held, keep


def check_hyperparameters(filled: dict[str, Any]):
    if filled["optimizer"] not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {filled['optimizer']!r}; accepted: "
                        f"{', '.join(OPTIMIZERS)}")
    if filled["schedule"] not in SCHEDULES:
        raise UserError(f"unknown schedule {filled['schedule']!r}; accepted: "
                        f"{', '.join(SCHEDULES)}")
    if not 0 < filled["lr"] < float("inf"):  # inf would open a run that diverges at once
        raise UserError(f"--lr must be a positive finite number, got {filled['lr']}")
    if not 0 <= filled["momentum"] < 1:
        raise UserError(f"--momentum must be in [0, 1), got {filled['momentum']}")
    if not 0 <= filled["weight_decay"] < float("inf"):
        raise UserError(f"--weight-decay must be a finite number >= 0, got "
                        f"{filled['weight_decay']}")
