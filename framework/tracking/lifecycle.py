"""A run's lifecycle: :func:`start_run` opens (or resumes) a run in its experiment and
ends it FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import UserError
from .common import DEFAULT_EXPERIMENT, EXPERIMENT_KIND, MODEL_TRAINING, NOTE, quiet_mlflow
from .run import Run
from .server import is_server, require_server


def _open(uri: str, experiment: str | None, run_name: str | None, parent: str | None,
          existing: str | None = None) -> str:
    """The id of the run to log into: ``existing`` (a run continued), a new run (a child of
    ``parent``, or of the run active in this process, when there is one), or under
    ``mlflow run`` with no parent, the run ``mlflow run`` opened (``MLFLOW_RUN_ID``)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient(uri)
    if existing:
        return client.get_run(existing).info.run_id
    outer = os.environ.get("MLFLOW_RUN_ID")
    if outer and parent is None:
        return client.get_run(outer).info.run_id
    active = mlflow.active_run()
    parent = parent or (active.info.run_id if active else None)
    name = experiment or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else _create_experiment(client, name)
    if EXPERIMENT_KIND not in (found.tags if found else {}):
        # MLflow 3's UI shows an experiment without this tag as GenAI (traces), not its runs
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    from mlflow.tracking.context.registry import resolve_tags

    # who and what started it (the UI's "Created by" and "Source"), as mlflow.start_run sets
    tags = {**resolve_tags(), **where_tags(),
            **({MLFLOW_PARENT_RUN_ID: parent} if parent else {})}
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


HOST_TAG = "cifarx.host"  # the machine a run ran on
RAY_NODE_TAG = "cifarx.ray_node"  # and its Ray node, when a Ray worker ran it


def where_tags() -> dict[str, str]:
    """Where a run ran: its host, its Ray node (in a Ray worker), and cifarx as its source
    (MLflow's "Source" would name the interpreter's script: Ray's ``default_worker.py``, a
    worker process's ``-c``)."""
    tags = {"mlflow.source.name": "cifarx", HOST_TAG: socket.gethostname()}
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            tags[RAY_NODE_TAG] = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001  a driver between ray calls: no node of its own
            pass
    return tags


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the database, in
    ``mlruns/<experiment>``. MLflow's default, ``./mlruns`` in whatever folder the process runs
    in, scattered artifacts over the callers' folders (and a test's). None: the store decides."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.endswith(":memory:"):
        return None
    folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "_"
    return (Path(uri[len(prefix):]).absolute().parent / "mlruns" / folder).as_uri()


def _create_experiment(client, name: str) -> str:
    """Create an experiment; another process may create it first (a sweep's workers)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location(
            client.tracking_uri, name))
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def start_run(uri: str, experiment: str | None = None, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None, parent: str | None = None,
              existing: str | None = None, description: str | None = None,
              system_metrics: bool = False) -> Iterator[Run]:
    """Open a run and end it FINISHED, FAILED (on an exception) or KILLED (on Ctrl-C).

    ``parent``: the run id this one is a child of (``mlflow.parentRunId``); a run opened while
    another is active in this process is that one's child. Under ``mlflow run``
    (``MLFLOW_RUN_ID`` set) a run without ``parent`` is the run mlflow opened: one command,
    one run. ``existing``: the id of a run to continue (a sweep resumed) instead of a new one.
    ``description``: the run's note (the MLflow UI's Description). ``system_metrics``: sample
    CPU, memory (and GPU) into ``system/*`` metrics while the run is open (MLflow's monitor;
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets how often, 10 s by default).
    """
    import mlflow
    from sqlalchemy.exc import SQLAlchemyError

    from .store import prepare_store

    quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    require_server(uri)  # a server that does not answer: one line now, not minutes of retries
    try:
        prepare_store(uri)
        run_id = _open(uri, experiment, run_name, parent, existing)
        info = mlflow.MlflowClient(uri).get_run(run_id).info
        # Active for the code that looks for an active run (a nested run's parent); nested, so
        # that a caller's own active run stays as it was. MLflow checks the fluent experiment
        # first, and puts a logged model in it.
        mlflow.set_experiment(experiment_id=info.experiment_id)
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None,
                         log_system_metrics=system_metrics)
    except (mlflow.exceptions.MlflowException, OSError, SQLAlchemyError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        raise UserError(f"cannot open an MLflow run at {uri}: {reason.splitlines()[0]}") from None
    run = Run(run_id, info.experiment_id)
    if is_server(uri):  # lost mid-run, it is logged into a local spool (see cifarx.spool)
        from .spool import Link

        run.link = Link(uri, run_id, info.run_name, info.experiment_id, run._apply,
                        run._unstored)
    status = "FAILED"
    try:
        if tags or description:
            run.set_tags({**(tags or {}), **({NOTE: description} if description else {})})
        yield run
        run.wait()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:  # the run says why it failed, not only the console
        _record_error(run, exc)
        raise
    finally:
        if status != "FINISHED":
            try:  # keep what was measured: the queued metrics still reach the store
                run.wait()
            except Exception:
                pass
        _end(run, status)


def _end(run: Run, status: str, attempts: int = 3):
    """End the run, trying again a little later: a run that could not be ended stays RUNNING
    for good (a full disk: the failed write's temporary files are removed by then)."""
    for attempt in range(attempts):
        try:
            return run.end(status)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


ERROR_TAG = "cifarx.error"


def _record_error(run: Run, exc: BaseException):
    """The error on the failed run: one line as the tag ``cifarx.error`` and, for anything
    but bad input, the traceback as ``error.txt``. Never raises: the run must still end."""
    import traceback

    exc.cifarx_run = run.id  # the CLI points to the run's error.txt
    try:
        line = " ".join(f"{type(exc).__name__}: {exc}".split())[:4000]
        run.set_tags({ERROR_TAG: line})
        if not isinstance(exc, UserError):
            run.log_text("".join(traceback.format_exception(exc)), "error.txt")
    except Exception:
        pass
