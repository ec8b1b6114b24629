"""What the CLI shows: the training progress bar and end-of-run tables (rich)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

out = Console()
err = Console(stderr=True)


class TrainingProgress:
    """A progress bar with step, loss, train accuracy, last test accuracy and images/s."""

    EVERY = 10.0  # seconds between plain lines when stderr is not a terminal

    def __init__(self, iters: int, batch_size: int, label: str):
        self.batch_size, self.iters = batch_size, iters
        # Output to a file (a log, CI, nohup): a bar would show only when the run ends (and
        # never if it is killed), so plain lines instead, every EVERY seconds and at the end.
        self.plain = not err.is_terminal
        self.said_at, self.fields = -math.inf, {"loss": "-", "train": "-", "test": "-"}
        # Most important first, as a narrow terminal cuts the line from the right; below 110
        # columns the label (printed again with the result) is left out.
        count = len(f"{iters}/{iters}")
        columns = [
            BarColumn(bar_width=12 if err.width < 110 else 24),
            MofNCompleteColumn(table_column=Column(min_width=count, no_wrap=True)),
            TimeRemainingColumn(table_column=Column(min_width=7, no_wrap=True)),
            TextColumn("loss {task.fields[loss]} train {task.fields[train]} "
                       "test {task.fields[test]} {task.fields[speed]} img/s",
                       table_column=Column(no_wrap=True))]
        if err.width >= 110:
            columns.append(TextColumn("[bold]{task.description}",
                                      table_column=Column(no_wrap=True, overflow="ellipsis")))
        self.progress = Progress(*columns, console=err)
        self.task = self.progress.add_task(label, total=iters, loss="-", train="-", test="-",
                                           speed="-")
        self.started = time.perf_counter()

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, points: list[tuple[str, float, int, int]]):
        """A training listener: the new metric points, (key, value, step, time)."""
        if not points:
            return
        if self.plain:
            return self._line(points)
        if not self.progress.live.is_started:  # shown from the first metrics on: an error
            self.progress.start()               # before them is one line, with no bar
        step = max(p[2] for p in points)
        latest = {key: value for key, value, _, _ in points}
        fields = {"speed": f"{step * self.batch_size / (time.perf_counter() - self.started):,.0f}"}
        if "train/loss" in latest:
            fields["loss"] = f"{latest['train/loss']:.3f}"
        if "train/acc" in latest:
            fields["train"] = f"{latest['train/acc']:.1%}"
        if "test/acc" in latest:
            fields["test"] = f"{latest['test/acc']:.2%}"
        self.progress.update(self.task, completed=step, **fields)


    def _line(self, points):
        step = max(p[2] for p in points)
        for key, value, _, _ in points:
            name = {"train/loss": "loss", "train/acc": "train", "test/acc": "test"}.get(key)
            if name:
                self.fields[name] = f"{value:.3f}" if name == "loss" else \
                    f"{value:.1%}" if name == "train" else f"{value:.2%}"
        now = time.perf_counter()
        if now - self.said_at < self.EVERY and step < self.iters:
            return
        self.said_at = now
        elapsed = now - self.started
        left = elapsed / step * (self.iters - step) if step else math.nan
        f = self.fields
        err.file.write(f"step {step}/{self.iters} ({step / self.iters:.0%})  loss {f['loss']}  "
                       f"train {f['train']}  test {f['test']}  "
                       f"{step * self.batch_size / elapsed:,.0f} img/s  "
                       f"ETA {duration(left) if math.isfinite(left) else '-'}\n")
        err.file.flush()


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# The MLflow 3 UI opens in its GenAI mode (traces) unless the page asks for model training.
MODEL_TRAINING = "workflowType=machine_learning"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see a run: its page on the tracking server, or a `cifarx ui` command that
    works from this shell (the venv's cifarx when `cifarx` is not on PATH), and the page."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open it: {tracking_uri.rstrip('/')}/{page}"
    here = "sqlite:///" + str(Path("mlflow.db").absolute())
    where = "" if tracking_uri == here else f" --tracking-uri '{tracking_uri}'"
    return f"open it: {cifarx_command()} ui{where}  ->  http://127.0.0.1:5000/{page}"


def registry_hint(tracking_uri: str, name: str, version: str) -> str:
    """Where to see a registered model version: its page in the Model Registry."""
    from urllib.parse import quote

    page = f"#/models/{quote(name, safe='')}/versions/{version}?{MODEL_TRAINING}"
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) \
        else "http://127.0.0.1:5000"
    return f"registered as {name} version {version}: {base}/{page}"


def cifarx_command() -> str:
    """How to run this cifarx again from this shell: ``cifarx`` when that is on PATH (and is
    this one), else its path (``make run`` uses the venv's without activating it)."""
    import shutil
    import sys

    script = Path(sys.argv[0])
    if script.name != "cifarx":  # python -m cifarx, a test runner
        return "cifarx" if shutil.which("cifarx") else f"{sys.executable} -m cifarx"
    found = shutil.which("cifarx")
    if found and Path(found).resolve() == script.resolve():
        return "cifarx"
    return str(script if script.is_absolute() else script.absolute())


def image_table(adv_set: dict[str, Any]):
    from rich.table import Table

    classes = adv_set["classes"]
    table = Table("image", "class", "conf", "adv. class", "conf", "steps", "L-inf", "L2", "goal",
                  title=f"{adv_set['attack']}: each image (test set index; L-inf in 1/255)")
    for i in range(len(adv_set["labels"])):
        table.add_row(
            str(int(adv_set["indices"][i])) if adv_set["indices"][i] >= 0 else "noise",
            classes[adv_set["labels"][i]],
            f"{adv_set['conf'][i]:.1%}", classes[adv_set["adv_labels"][i]],
            f"{adv_set['adv_conf'][i]:.1%}", str(int(adv_set["steps"][i])),
            f"{adv_set['linf'][i] * 255:.1f}", f"{adv_set['l2'][i]:.3f}",
            "ok" if adv_set["success"][i] else "[red]failed[/]")
    return table




def transfer_table(sources: list[dict], targets: list[dict], cells: list[dict]):
    """One row per pair, or for more than one pair a set x model matrix that fits a terminal."""
    from rich.table import Table

    pct = lambda v: "-" if math.isnan(v) else f"{v:.1%}"  # noqa: E731
    if len(cells) == 1:
        (c,) = cells
        table = Table("adversarial set", "target model", "images", "acc orig.", "acc adv.",
                      "transfer", "same class", title="transfer of adversarial images")
        table.add_row(sources[0]["label"], targets[0]["label"], str(c["images"]),
                      pct(c["clean_acc"]), pct(c["adv_acc"]), pct(c["transfer_rate"]),
                      pct(c["same_class_rate"]))
        return table
    table = Table("adversarial set", *(t["label"] for t in targets),
                  title="transfer of adversarial images: transfer rate / accuracy on them")
    cell = {(c["source"], c["target"]): c for c in cells}
    for s in sources:
        table.add_row(s["label"], *(f"{pct(cell[s['key'], t['key']]['transfer_rate'])} / "
                                    f"{pct(cell[s['key'], t['key']]['adv_acc'])}"
                                    for t in targets))
    return table


# --- the commands ---------------------------------------------------------------------------

def print_whole(table) -> None:
    """Print a table on stdout; into a file or pipe (no terminal to fit, rich assumes 80
    columns) at its natural width, so that a sweep's log keeps every value whole."""
    from rich.measure import Measurement

    if out.is_terminal:
        out.print(table)
        return
    width, out.width = out.width, Measurement.get(
        out, out.options.update(max_width=10_000), table).maximum
    try:
        out.print(table)
    finally:
        out.width = width


def sweep_table(ranked: list[dict[str, Any]], axes: list[str], metric: str):
    """The configurations best first: the metric over seeds, and each against the control
    (the study's baseline, else the best): the difference, the corrected p, the verdict."""
    from rich.table import Column, Table

    from ..plugin_api.options import show

    pct = metric.endswith("acc")
    fmt = (lambda v: "-" if math.isnan(v) else f"{v:.2%}") if pct else \
        (lambda v: "-" if math.isnan(v) else f"{v:.4g}")  # noqa: E731
    signed = (lambda v: "-" if math.isnan(v) else f"{v * 100:+.2f} pt") if pct else \
        (lambda v: "-" if math.isnan(v) else f"{v:+.4g}")  # noqa: E731
    shown = {"control": "[bold]control[/]", "better": "[green]better[/]",
             "worse": "[red]worse[/]", "indistinguishable": "same", "untested": "-"}
    # In a narrow terminal every cell folds rather than end in "…": each value stays whole.
    headers = ["#", *axes, "n", "mean", "std", "95% interval", "vs control", "p (corrected)",
               "verdict"]
    table = Table(*(Column(h, overflow="fold") for h in headers),
                  title=f"configurations by {metric}")
    for row in ranked:
        table.add_row("-" if row["rank"] is None else str(row["rank"]),
                      *(show(row.get(a)) for a in axes),
                      str(row[f"{metric}_n"]), fmt(row[f"{metric}_mean"]),
                      fmt(row[f"{metric}_std"]),
                      f"{fmt(row[f'{metric}_ci_low'])} to {fmt(row[f'{metric}_ci_high'])}",
                      signed(row["difference"]),
                      "-" if math.isnan(row["p_adjusted"]) else f"{row['p_adjusted']:.3f}",
                      shown[row["verdict"]])
    return table
