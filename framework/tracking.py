"""MLflow: where runs go, a run's lifecycle, buffered metrics, and models in and out.

mlflow and torch are imported inside the functions that need them: they take seconds to
import, and ``cifarx --help`` should not pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cifarx"
# The experiment tag that makes MLflow 3's UI open an experiment on its runs (model training);
# set on the experiments cifarx logs to, unless the user set another kind.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MODEL_ARTIFACT = "model"

# (key, value, step, timestamp in ms)
Point = tuple[str, float, int, int]


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


class MetricLog:
    """Metrics held as device tensors until :meth:`flush`, which moves them in one transfer.

    Calling ``.item()`` every step would stall a GPU; here a step only appends references.
    ``history`` keeps every flushed value on the host (for figures); ``sink`` receives the new
    points (for MLflow).
    """

    def __init__(self, sink: Callable[[list[Point]], None] | None = None):
        self.sink = sink
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._pending: list[tuple[str, Tensor | float, int, int]] = []

    def add(self, step: int, values: Mapping[str, Tensor | float]):
        """Keep ``values`` (0-dim tensors or numbers) measured at ``step``."""
        now = int(time.time() * 1000)
        self._pending.extend((key, value, step, now) for key, value in values.items())

    def flush(self) -> dict[str, float]:
        """Send what is pending; return the latest value of each key flushed."""
        if not self._pending:
            return {}
        import torch
        from torch import Tensor

        tensors = [v for _, v, _, _ in self._pending if isinstance(v, Tensor)]
        host = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
                    if tensors else [])
        points = [(key, next(host) if isinstance(v, Tensor) else float(v), step, ts)
                  for key, v, step, ts in self._pending]
        self._pending.clear()
        latest = {}
        for key, value, step, _ in points:
            self.history.setdefault(key, []).append((step, value))
            latest[key] = value
        if self.sink is not None:
            self.sink(points)
        return latest


class Run:
    """The MLflow run a command logs into."""

    def __init__(self, run_id: str):
        import mlflow

        self.id = run_id
        self.client = mlflow.MlflowClient()
        self._pending = []  # metric batches being written by MLflow's async logging thread

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.id).info.experiment_id

    def log_params(self, params: Mapping[str, Any]):
        """Log params; keys already present (set by ``mlflow run -P``) are left as they are."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.id, params=fresh[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]):
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_points(self, points: list[Point]):
        """Queue metrics for MLflow's writer thread: training does not wait for the store."""
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ts, step) for key, value, step, ts in points]
        for i in range(0, len(metrics), 1000):  # the store's limit per batch
            self._pending.append(self.client.log_batch(self.id, metrics=metrics[i:i + 1000],
                                                       synchronous=False))

    def wait(self):
        """Block until every queued metric is stored; raises what the writer raised."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def log_figure(self, figure, path: str):
        import matplotlib.pyplot as plt

        self.client.log_figure(self.id, figure, path)
        plt.close(figure)

    def log_dict(self, obj: Any, path: str):
        self.client.log_dict(self.id, obj, path)

    def log_text(self, text: str, path: str):
        self.client.log_text(self.id, text, path)

    def log_artifact(self, local_path: Path, artifact_dir: str | None = None):
        self.client.log_artifact(self.id, str(local_path), artifact_dir)

    def log_dataset(self, name: str, source: str, digest: str, context: str):
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(source=LocalArtifactDatasetSource(source), name=name, digest=digest)
        with _active(self.id):
            mlflow.log_input(dataset, context=context)

    def log_model(self, model: nn.Module, packages: tuple[str, ...] = ()) -> str:
        """Save ``model`` as the MLflow model ``runs:/<id>/model``; returns that URI.

        The pickle format loads back the original ``nn.Module`` (eval()/train() work, attacks
        can call it), where MLflow's default 'pt2' export would give a GraphModule whose
        ``eval()`` raises. The price: loading needs the classes importable (cifarx and the
        plugin that built the model installed), which the pinned requirements say.
        """
        import mlflow
        import mlflow.pytorch

        with _active(self.id):
            mlflow.pytorch.log_model(model, name=MODEL_ARTIFACT, serialization_format="pickle",
                                     pip_requirements=requirements_for(model, packages))
        return f"runs:/{self.id}/{MODEL_ARTIFACT}"


@contextlib.contextmanager
def _active(run_id: str):
    """Make ``run_id`` the fluent API's active run for a call that needs one."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


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
    tags = {MLFLOW_PARENT_RUN_ID: parent} if parent else {}
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def _create_experiment(client, name: str) -> str:
    """Create an experiment; another process may create it first (a sweep's workers)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def start_run(uri: str, experiment: str | None = None, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None, parent: str | None = None,
              existing: str | None = None) -> Iterator[Run]:
    """Open a run and end it FINISHED, FAILED (on an exception) or KILLED (on Ctrl-C).

    ``parent``: the run id this one is a child of (``mlflow.parentRunId``); a run opened while
    another is active in this process is that one's child. Under ``mlflow run``
    (``MLFLOW_RUN_ID`` set) a run without ``parent`` is the run mlflow opened: one command,
    one run. ``existing``: the id of a run to continue (a sweep resumed) instead of a new one.
    """
    import mlflow
    from sqlalchemy.exc import SQLAlchemyError

    from .store import prepare_store

    quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    try:
        prepare_store(uri)
        run_id = _open(uri, experiment, run_name, parent, existing)
        # Active for the fluent calls that need it (log_model, log_input); nested, so that a
        # caller's own active run stays as it was. MLflow checks the fluent experiment first.
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id)
                              .info.experiment_id)
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    except (mlflow.exceptions.MlflowException, OSError, SQLAlchemyError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        raise UserError(f"cannot open an MLflow run at {uri}: {reason.splitlines()[0]}") from None
    run = Run(run_id)
    status = "FAILED"
    try:
        if tags:
            run.set_tags(tags)
        yield run
        run.wait()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            try:  # keep what was measured: the queued metrics still reach the store
                run.wait()
            except Exception:
                pass
        mlflow.end_run(status)


def requirements_for(model: nn.Module, extra: tuple[str, ...] = ()) -> list[str]:
    """Pinned pip requirements for every package whose classes the pickled model holds, and
    the ``extra`` distributions (the plugin packages the run used).

    Given explicitly: letting MLflow infer them took 4 to 15 s per model.
    """
    packages = {"torch", "cifarx"} | {type(m).__module__.split(".")[0] for m in model.modules()}
    packages |= set(extra)
    by_module = importlib.metadata.packages_distributions()
    requirements = set()
    for module in sorted(packages):
        for dist in by_module.get(module, [module]):
            try:
                requirements.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return sorted(requirements)


def load_model(uri: str, tracking: str, device: torch.device | str = "cpu") -> nn.Module:
    """A model from ``runs:/<id>/model``, ``models:/...`` or a local MLflow model folder."""
    import mlflow
    import mlflow.pytorch
    import torch
    from torch import nn

    quiet_mlflow()
    mlflow.set_tracking_uri(tracking)
    if "://" not in uri and ":/" not in uri:
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise UserError(f"--model {uri}: no MLflow model there (no MLmodel file); accepted: "
                            "runs:/<run id>/model, models:/<name>/<version>, or a model folder")
        uri = str(path)
    elif uri.startswith("runs:/"):
        check_run_model(uri, tracking)
    try:
        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"--model {uri}: cannot load it ({exc.message.splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"--model {uri}: cannot load it ({exc})") from None
    except ModuleNotFoundError as exc:
        raise UserError(f"--model {uri}: the model needs {exc.name!r}, which is not installed "
                        "(install the plugin package that built it)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {uri} is not a PyTorch model")
    return model.eval()


def check_run_model(uri: str, tracking: str):
    """Say plainly when a ``runs:/<id>/<path>`` URI names no run, or a run without a model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id, _, path = uri[len("runs:/"):].partition("/")
    client = MlflowClient(tracking)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--model {uri}: no run {run_id!r} in the store {tracking} (see the "
                        "runs with `cifarx ui`, or set --tracking-uri)") from None
    path = path.strip("/") or "model"
    if not any(a.path == f"{path}/MLmodel" for a in client.list_artifacts(run_id, path)):
        has = ", ".join(a.path for a in client.list_artifacts(run_id)) or "nothing"
        raise UserError(f"--model {uri}: run {run_id} ({run.info.run_name}) has no model at "
                        f"{path!r} (its artifacts: {has}); `cifarx train` runs log theirs as "
                        "runs:/<run id>/model")


def source_run_id(uri: str) -> str | None:
    """The run a ``runs:/<id>/...`` URI points into, for linking runs."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/")[0] or None
    return None


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
