"""``cifarx ui``: the MLflow UI on the tracking store."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import TrackingUri, command


@command
def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(
        help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 serves the network, "
             "with no authentication.")] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        help="Where the artifacts of runs logged through a tracking server (mlflow-artifacts:/) "
             "are: the folder (or URI) that server stored them in, its --artifacts-destination "
             "(default: its ./mlartifacts; found beside the database when it is there).",
        show_default=False)] = None,
):
    """Start the MLflow UI on the store (a tracking server already has its own: it says where)."""
    import errno
    import ipaddress
    import socket

    from ..tracking.common import tracking_uri as resolve_uri
    from .console import MODEL_TRAINING, err, out

    uri = resolve_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        out.print(f"{uri} is an MLflow server: its UI is already there, open "
                  f"{uri.rstrip('/')}/#/?{MODEL_TRAINING}",
                  highlight=False, soft_wrap=True)
        return
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: accepted: 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # the server would print a traceback and exit 0 on a busy port
            probe.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise UserError(f"--host {host} --port {port}: {reason}; choose another port "
                            f"(--port {port + 1}) or stop what serves there") from None
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        err.print(f"cifarx: warning: the MLflow UI has no authentication: anyone who reaches "
                  f"{host}:{port} can read, change and delete every run", highlight=False,
                  soft_wrap=True)
    served = _served_artifacts(uri, artifacts_destination)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    err.print(f"MLflow UI for {uri} at http://{shown}:{port}/#/?{MODEL_TRAINING} (Ctrl-C "
              "stops it)", highlight=False, soft_wrap=True)
    # The server's background job runners serve MLflow's GenAI features, not these runs: off
    # unless asked for, as they cost eight processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": uri}
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port),
                               "--artifacts-destination", served], env)


def _served_artifacts(uri: str, given: str | None) -> str:
    """The folder the UI serves ``mlflow-artifacts:/`` URIs from: those of the runs logged
    through a tracking server into this store. MLflow's default is ./mlartifacts wherever the
    UI starts, where they are not: it then shows "No Artifacts Recorded". ``given``; else the
    server's default folder beside an SQLite database, when it is there; else ./mlartifacts,
    with a warning when the store has such runs."""
    from .console import err

    if given:
        return given if "://" in given else str(Path(given).expanduser().absolute())
    sqlite = "sqlite:///"
    beside = Path(uri[len(sqlite):]).parent / "mlartifacts" if uri.startswith(sqlite) else None
    count = _server_logged_runs(uri)
    if count and beside is not None and beside.is_dir():
        err.print(f"artifacts of the {count} run(s) logged through a tracking server: {beside} "
                  "(--artifacts-destination to say otherwise)", highlight=False, soft_wrap=True)
        return str(beside)
    if count:
        err.print(f"cifarx: warning: {count} run(s) in this store keep their artifacts where the "
                  "tracking server they were logged through stored them (mlflow-artifacts:/...): "
                  "pass that server's --artifacts-destination (default: ./mlartifacts in the "
                  "folder it was started in) as --artifacts-destination, or the UI shows them "
                  "without artifacts", highlight=False, soft_wrap=True)
    return str(Path("mlartifacts").absolute())


def _server_logged_runs(uri: str) -> int:
    """How many runs of the store have their artifacts on a tracking server; 0 when the store
    cannot say (not a database yet, another schema)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect() as db:
                return db.execute(sqlalchemy.text(
                    "SELECT COUNT(*) FROM runs WHERE artifact_uri LIKE 'mlflow-artifacts:%'"
                )).scalar() or 0
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001  a store to serve, not to check
        return 0
