"""What stops a training from the outside or from within: SIGTERM while checkpointing, and a
loss that is no longer a number."""

from __future__ import annotations

from ..errors import Diverged
from .config import Plan


class OnSigterm:
    """While training with checkpoints, SIGTERM only sets a flag: the loop finishes the step
    under way, saves a checkpoint and raises Terminated (a state saved mid-step would not
    resume exactly). Outside the main thread (where signals cannot be handled) it never
    fires."""

    def __init__(self):
        import signal
        import threading

        self._fired = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._fired.set())

    def is_set(self) -> bool:
        return self._fired.is_set()

    def restore(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def diverged(plan: Plan, step: int, value: float, history) -> Diverged:
    cfg = plan.config
    advice = "a lower --lr" + (", another --arch-opt init" if "init" in plan.arch_options else "")
    error = Diverged(f"training diverged: train/loss is {value} at iteration {step} of "
                     f"{cfg.iters} ({cfg.arch}, lr {cfg.lr:g}); try {advice}, or an architecture "
                     "with normalization or skip connections", step, value)
    error.history = history
    return error
