"""What the CLI shows: the training progress bar and end-of-run summaries (rich)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

out = Console()
err = Console(stderr=True)


class TrainingProgress:
    """A progress bar with step, loss, train accuracy, last test accuracy and images/s."""

    def __init__(self, iters: int, batch_size: int, label: str):
        self.batch_size = batch_size
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  train {task.fields[train]}  "
                       "test {task.fields[test]}  {task.fields[speed]} img/s"),
            TimeRemainingColumn(), console=err)
        self.task = self.progress.add_task(label, total=iters, loss="-", train="-", test="-",
                                           speed="-")
        self.started = time.perf_counter()

    def __enter__(self):
        self.progress.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, step: int, latest: Mapping[str, float]):
        fields = {"speed": f"{step * self.batch_size / (time.perf_counter() - self.started):,.0f}"}
        if "train/loss" in latest:
            fields["loss"] = f"{latest['train/loss']:.3f}"
        if "train/acc" in latest:
            fields["train"] = f"{latest['train/acc']:.1%}"
        if "test/acc" in latest:
            fields["test"] = f"{latest['test/acc']:.2%}"
        self.progress.update(self.task, completed=step, **fields)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    here = "sqlite:///" + str(Path("mlflow.db").absolute())
    where = "" if tracking_uri == here else f" --tracking-uri '{tracking_uri}'"
    return (f"open it: cifarx ui{where}  ->  "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")
