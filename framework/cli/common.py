"""What the commands share: the app, :func:`command` (a UserError is one line and status
2), the options' types, the tracking flags.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import __version__
from ..errors import Diverged, Terminated, UserError, raise_on_sigterm

app = typer.Typer(
    name="cifarx", no_args_is_help=True, add_completion=False,
    help="Train, probe and attack small-image CNNs; every run is tracked in MLflow.")


def command(fn):
    """Register a command whose UserError becomes one line and exit status 2 (a diverged
    training: one line and status 3)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import signal

        previous = raise_on_sigterm()  # SIGTERM ends the runs KILLED, as Ctrl-C does
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Diverged as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(Diverged.exit_status) from None
        except Terminated:
            typer.echo("cifarx: terminated (SIGTERM)", err=True)
            raise typer.Exit(Terminated.exit_status) from None
        except KeyboardInterrupt:
            typer.echo("cifarx: interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            run = getattr(exc, "cifarx_run", None)
            typer.echo(f"cifarx: error: the disk is full (writing {exc.filename or 'a file'}): "
                       "free some space and run again"
                       + (f"; run {run} ended FAILED with what it had logged" if run else ""),
                       err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a plugin's own failure: name it; a bug of cifarx: traceback
            from ..plugin_api.registry import catalog

            culprit = catalog().blame(exc.__traceback__)
            if culprit is None or culprit.builtin or os.environ.get("CIFARX_TRACEBACK"):
                raise
            run = getattr(exc, "cifarx_run", None)
            where = (f"the traceback is in run {run}, error.txt" if run else
                     "CIFARX_TRACEBACK=1 shows the traceback")
            typer.echo(f"cifarx: error: the {culprit.kind} plugin {culprit.name!r} of "
                       f"{culprit.package} {culprit.version} failed: "
                       f"{' '.join(f'{type(exc).__name__}: {exc}'.split())} ({where})",
                       err=True)
            raise typer.Exit(1) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return app.command()(run)


def plugins_catalog():
    from ..plugin_api.registry import catalog

    found = catalog()
    for problem in found.problems:
        typer.echo(f"cifarx: warning: {problem}", err=True)
    return found


def _version(value: bool):
    if value:
        typer.echo(f"cifarx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    pass


def _threads(threads: int | None):
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def check_tag_key(key: str, text: str) -> str:
    """MLflow's own rule for tag keys, applied before any run opens (a refused key failed the
    run after it had started)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_tag_name

    try:
        _validate_tag_name(key)
    except MlflowException as exc:
        why = str(exc.message).partition("supplied: ")[2].split(". ")[0] or "refused"
        raise UserError(f"--tag {text}: MLflow refuses the key {key!r}: {why}") from None
    return key


def _tracking(tracking_uri, experiment, run_name, description=None, tag=None,
              system_metrics=True, register_model=None):
    """Where the command's run goes; every command that opens a run calls this first, so a
    tracking server that does not answer is one line before any work (cifarx.spool)."""
    from ..runs.common import Tracking
    from ..tracking.server import require_server

    tags = {}
    for text in tag or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tag {text}: accepted: KEY=VALUE")
        tags[check_tag_key(key.strip(), text)] = value.strip()
    tracking = Tracking(tracking_uri, experiment, run_name, tags=tags, description=description,
                        system_metrics=system_metrics, register_model=register_model)
    require_server(tracking.resolved_uri)
    return tracking


def _open_hint(uri: str | None, experiment_id: str, run_id: str):
    from ..tracking.common import tracking_uri
    from .console import out, ui_hint

    out.print(ui_hint(tracking_uri(uri), experiment_id, run_id), highlight=False, soft_wrap=True)


# Options shared by the commands that run something.
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
Precision = Annotated[str, typer.Option(
    help="Forward passes in fp32, or bf16 (autocast; weights, loss and gradients stay fp32); "
         "auto: bf16 where the device computes it natively (recent GPUs, AVX-512 CPUs).")]
Seed = Annotated[int, typer.Option(help="Seed for weights, batches, augmentation and attacks.")]
DataDir = Annotated[Optional[Path], typer.Option(
    help="Folder holding the dataset files (default: $CIFARX_DATA_DIR or ~/.cache/cifarx).",
    show_default=False)]
Experiment = Annotated[str, typer.Option(help="MLflow experiment name.")]
RunName = Annotated[Optional[str], typer.Option(help="MLflow run name (default: from the options).",
                                                show_default=False)]
TrackingUri = Annotated[Optional[str], typer.Option(
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).",
    show_default=False)]
DatasetName = Annotated[str, typer.Option("--dataset", help="Dataset plugin.")]
ModelDataset = Annotated[Optional[str], typer.Option(
    "--dataset", help="Dataset plugin (default: the one the model was trained on).",
    show_default=False)]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Load a model that is only a pickle (another tool's, or an older "
    "cifarx's): unpickling runs whatever code its author put in it. Also CIFARX_TRUST_PICKLE=1.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's choice).",
                                                show_default=False)]
Description = Annotated[Optional[str], typer.Option(
    help="The run's description in the MLflow UI (default: what the command did).",
    show_default=False)]
Tag = Annotated[Optional[list[str]], typer.Option(
    help="A tag on the run: KEY=VALUE; repeatable.", show_default=False)]
SystemMetrics = Annotated[bool, typer.Option(
    "--system-metrics/--no-system-metrics",
    help="Sample CPU, memory and GPU use into the run's system/* metrics (MLflow's monitor; "
         "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets the period, 10 s).")]


def opt_flag(kind: str, shape: str) -> object:
    """A repeatable option flag (``--arch-opt NAME=VALUE``): one help text for every kind."""
    return Annotated[Optional[list[str]], typer.Option(
        help=f"{kind.capitalize()} option {shape}, repeatable (`cifarx describe {kind} NAME` "
             "lists a plugin's options).", show_default=False)]


ArchOpt = opt_flag("architecture", "NAME=VALUE")
AugOpt = opt_flag("augmentation", "PLUGIN.NAME=VALUE")
ProbeOpt = opt_flag("probe", "PLUGIN.NAME=VALUE")
AttackOpt = opt_flag("attack", "NAME=VALUE")
DatasetOpt = opt_flag("dataset", "NAME=VALUE")
ExecutorOpt = opt_flag("executor", "NAME=VALUE")
AnalysisOpt = opt_flag("analysis", "PLUGIN.NAME=VALUE")
PER_ARCH = "(default: the architecture's, else {})"
MODEL_HELP = "runs:/<run id>/model, models:/<name>/<version>, or a local MLflow model folder."


def _print_findings(name: str, findings, seconds: float | None = None):
    from .console import duration, out

    took = f" ({duration(seconds)})" if seconds is not None else ""
    said = [findings.summary] if findings.summary else []
    files = [f"figures/{name}.png"] * (findings.figure is not None) + list(findings.files)
    out.print(f"[bold]{name}[/]{took}: " + "  ".join(said + files), highlight=False,
              soft_wrap=True)
