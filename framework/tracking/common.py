"""What every part of tracking shares: where runs go (:func:`tracking_uri`, the default
experiment), MLflow kept quiet, the tags and links the MLflow UI reads, and what a run
records about where it came from (data digest, git commit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .server import bound_waits

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cifarx"
# The experiment tag that makes MLflow 3's UI open an experiment on its runs (model training);
# set on the experiments cifarx logs to, unless the user set another kind.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(option: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.

    A relative SQLite path is made absolute, so the URI names one store wherever it is used.
    """
    uri = option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        uri = prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def quiet_mlflow():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  importing it sets its logger's level: set ours after

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # cifarx saves models with pickle on purpose (see log_model): no warning about it each time.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    # A tracking server that goes away: a call waits seconds, not minutes, and cifarx says
    # once what happened (see cifarx.spool) where the system-metrics thread would warn each time.
    bound_waits()
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    # cifarx prints its own link to a run, to the page of its model training (console.ui_hint);
    # MLflow's, printed on a server's runs, opens the GenAI page.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (and a logged model's)
VIEW_TAG = "mlflow.sharedViewState."  # + key: an experiment's saved view of its runs table


def ui_page(experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """A page of the MLflow UI as a link relative to the UI (``#/experiments/...``), for
    markdown in a description: a run's page, or the runs table in the saved ``view``."""
    from ..cli.console import MODEL_TRAINING

    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"
    shown = f"viewStateShareKey={view}&" if view else ""
    return f"#/experiments/{experiment_id}/runs?{shown}{MODEL_TRAINING}"


def runs_view(name: str, columns: list[str], search: str = "", order_by: str | None = None,
              ascending: bool = False, name_width: int = 240) -> str:
    """A saved view of the runs table, as MLflow 3's UI stores one in an experiment tag
    (``VIEW_TAG`` + key; the UI's *Views* menu lists it, ``?viewStateShareKey=KEY`` opens it):
    the runs that match ``search``, sorted by ``order_by``, ``columns`` (``params.`lr```,
    ``metrics.`final/test_acc```) shown after a Run Name column ``name_width`` pixels wide."""
    now = int(time.time() * 1000)
    run_name = "attributes.`Run Name`"
    state = {"searchFilter": search, "orderByAsc": ascending, "selectedColumns": columns,
             "columnOrder": [run_name, *columns], "columnWidths": {run_name: name_width},
             **({"orderByKey": order_by} if order_by else {})}
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now,
                       "state": json.dumps(state)})


def data_digest(*tensors: Tensor) -> str:
    """A short digest of the images and labels a run used, recorded with its dataset."""
    digest = hashlib.md5()
    for t in tensors:
        digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
