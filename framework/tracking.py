"""MLflow: where runs go, a run's lifecycle, buffered metrics, and models in and out.

mlflow and torch are imported inside the functions that need them: they take seconds to
import, and ``cifarx --help`` should not pay for them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .errors import UserError
from .spool import bound_waits, brief_waits, is_outage, is_server, require_server

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
    # A tracking server that goes away: a call waits seconds, not minutes, and cifarx says
    # once what happened (see cifarx.spool) where the system-metrics thread would warn each time.
    bound_waits()
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    # cifarx prints its own link to a run, to the page of its model training (console.ui_hint);
    # MLflow's, printed on a server's runs, opens the GenAI page.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def as_logged(value: float) -> float:
    """A float32 measurement as the number it is: 0.46, not 0.46000000834465027.

    Metrics are computed in float32; widening one to a double shows float32's rounding error
    as digits in MLflow. A value that a float32 holds exactly is logged as the shortest
    decimal that reads back as the same float32; any other value is a double and kept.
    """
    import numpy as np

    single = np.float32(value)
    if not np.isfinite(single) or float(single) != value:
        return value
    return float(str(single))  # numpy prints a float32 as its shortest round-trip decimal


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (and a logged model's)
VIEW_TAG = "mlflow.sharedViewState."  # + key: an experiment's saved view of its runs table


def ui_page(experiment_id: str, run_id: str | None = None, view: str | None = None) -> str:
    """A page of the MLflow UI as a link relative to the UI (``#/experiments/...``), for
    markdown in a description: a run's page, or the runs table in the saved ``view``."""
    from .console import MODEL_TRAINING

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
    """The MLflow run a command logs into.

    Every method builds a record (see :mod:`cifarx.spool`) and sends it with :meth:`_apply`;
    a run on a tracking server (``link``) keeps going into a local spool while the server is
    lost. Metrics go through a writer thread, so that training never waits for the store.
    """

    def __init__(self, run_id: str, experiment_id: str | None = None, link=None):
        import mlflow

        self.id = run_id
        self.client = mlflow.MlflowClient()
        self.link = link  # a spool.Link, for a run on a tracking server
        self._experiment_id = experiment_id
        self._writer = None  # the metrics writer thread, started by the first points
        self._pending: list[tuple[Any, list[Point]]] = []  # (future, points) not yet stored
        self.registered: tuple[str, str] | None = None  # (name, version) of the model registered

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.id).info.experiment_id
        return self._experiment_id

    def log_params(self, params: Mapping[str, Any]):
        """Log params; keys already present (set by ``mlflow run -P``) are left as they are."""
        self._send("params", {"params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]):
        self._send("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_points(self, points: list[Point]):
        """Queue metrics for the writer thread: training does not wait for the store.

        A batch stays in ``_pending`` until it is stored: one the server failed is sent again
        (or, with the server lost, spooled), so no point is lost between the two.
        """
        points = [(key, as_logged(value), step, ts) for key, value, step, ts in points]
        if not points:
            return
        self._settle(block=False)
        if self.link is not None and not self.link.live():
            self.link.deliver("metrics", {"points": points})
            return
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(1, thread_name_prefix="cifarx-metrics")
        self._pending.append((self._writer.submit(self._apply, "metrics", {"points": points}),
                              points))

    def wait(self):
        """Block until every queued metric is stored; raises what the store raised (a run
        on a server: the points it could not store are sent again, or spooled)."""
        self._settle(block=True)

    def log_figure(self, figure, path: str):
        import matplotlib.pyplot as plt

        try:
            self._log_file(path, figure.savefig)
        finally:
            plt.close(figure)

    def log_dict(self, obj: Any, path: str):
        def write(file: Path):
            if file.suffix in (".yaml", ".yml"):
                import yaml

                file.write_text(yaml.safe_dump(obj, default_flow_style=False))
            else:
                file.write_text(json.dumps(obj, indent=2))

        self._log_file(path, write)

    def log_text(self, text: str, path: str):
        self._log_file(path, lambda file: file.write_text(text, encoding="utf-8"))

    def log_artifact(self, local_path: Path, artifact_dir: str | None = None):
        self._send("artifact", {"file": str(local_path), "dir": artifact_dir})

    def log_dataset(self, name: str, source: str, digest: str, context: str):
        self._send("dataset", {"name": name, "source": source, "digest": digest,
                               "context": context})

    def save_view(self, key: str, view: str):
        """Store a saved view of the runs table (see :func:`runs_view`) in the run's
        experiment, as ``VIEW_TAG + key``."""
        self._send("view", {"key": key, "view": view})

    def log_model(self, model: nn.Module, packages: tuple[str, ...] = (),
                  recipe: Mapping[str, Any] | None = None, example: Tensor | None = None,
                  step: int = 0, tags: Mapping[str, str] | None = None,
                  register: str | None = None, metrics: Mapping[str, float] | None = None,
                  dataset: tuple[str, str] | None = None) -> str:
        """Save ``model`` as the MLflow model ``runs:/<id>/model``; returns that URI.

        With a ``recipe`` (see :mod:`cifarx.weights`), its weights and recipe go into the
        model's ``extra_files/``: cifarx loads it from them, never running a pickle. MLflow's
        pickle stays for ``mlflow.pytorch.load_model`` users: it loads back the original
        ``nn.Module`` (eval()/train() work), where MLflow's 'pt2' export would give a
        GraphModule whose ``eval()`` raises. ``example``: input images (pixels in [0, 1]), the
        model's input example and, with its output, its signature. The run's metrics logged
        at ``step`` are linked to the model (MLflow does this), and ``metrics`` are logged at
        ``step`` to both, measured on ``dataset`` (name, digest: a dataset the run logged);
        ``tags`` go on the model; ``register``: a name in the Model Registry to add it to as a
        new version.
        """
        self._send("model", {
            "model": model, "packages": list(packages), "recipe": dict(recipe or {}) or None,
            "example": example, "step": step, "tags": dict(tags or {}), "register": register,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "dataset": list(dataset) if dataset else None})
        return f"runs:/{self.id}/{MODEL_ARTIFACT}"

    def end(self, status: str):
        """End the run (the fluent active run) as ``status``; a run whose server is lost
        ends in its spool, which :meth:`spool.Link.close` then reports."""
        import mlflow

        end = {"status": status, "end_time": int(time.time() * 1000)}
        try:
            if self.link is None:
                mlflow.end_run(status)
            elif self.link.live(recheck=True):
                try:
                    mlflow.end_run(status)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self.link.divert(exc, [("end", end)])
            else:
                self.link.deliver("end", end)
                with brief_waits(), contextlib.suppress(Exception):  # to leave the fluent run
                    mlflow.end_run(status)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=False, cancel_futures=True)
            if self.link is not None:
                self.link.close()

    # --- sending ----------------------------------------------------------------------------

    def _send(self, kind: str, payload: dict[str, Any]):
        if self.link is None:
            self._apply(kind, payload)
        else:
            self.link.deliver(kind, payload)

    def _log_file(self, path: str, write: Callable[[Path], Any]):
        """The artifact ``path``, written by ``write(file)`` into a folder of its own, sent."""
        import tempfile

        parent, name = os.path.split(path)
        with tempfile.TemporaryDirectory(prefix="cifarx-artifact-") as tmp:
            write(Path(tmp, name))
            self._send("artifact", {"file": str(Path(tmp, name)), "dir": parent or None})

    def _settle(self, block: bool):
        """Take the metric batches the writer finished (all, waiting, with ``block``): a
        failed one is sent again through the link (spooled while the server is lost);
        without a link, its error is raised by :meth:`wait`."""
        waiting, failed = [], []
        for future, points in self._pending:
            if not block and not future.done():
                waiting.append((future, points))
            elif future.exception() is not None:
                if self.link is None and not block:
                    waiting.append((future, points))
                else:
                    failed.append((future.exception(), points))
        self._pending = waiting
        for exc, points in failed:
            if self.link is None:
                raise exc
            if is_outage(exc):  # the server just failed it: to the spool, no second wait
                self.link.divert(exc, [("metrics", {"points": points})])
            else:
                self.link.deliver("metrics", {"points": points})

    def _unstored(self) -> list:
        """For the link, when the server is lost: the metric batches not stored yet (those
        not started are cancelled), as records to spool."""
        pending, self._pending = self._pending, []
        records = []
        for future, points in pending:
            future.cancel()
            if not future.done() or future.cancelled() or future.exception() is not None:
                records.append(("metrics", {"points": points}))
        return records

    def _apply(self, kind: str, payload: dict[str, Any]):
        """Send one record to MLflow (the run's live logging, and a spool's upload)."""
        from mlflow.entities import Metric, Param, RunTag

        if kind == "metrics":
            metrics = [Metric(key, value, ts, step) for key, value, step, ts in payload["points"]]
            for i in range(0, len(metrics), 1000):  # the store's limit per batch
                self.client.log_batch(self.id, metrics=metrics[i:i + 1000])
        elif kind == "params":
            existing = self.client.get_run(self.id).data.params
            fresh = [Param(k, v) for k, v in payload["params"].items() if k not in existing]
            for i in range(0, len(fresh), 100):
                self.client.log_batch(self.id, params=fresh[i:i + 100])
        elif kind == "tags":
            self.client.log_batch(self.id, tags=[RunTag(k, v) for k, v in payload["tags"].items()])
        elif kind == "artifact":
            self.client.log_artifact(self.id, payload["file"], payload["dir"])
        elif kind == "dataset":
            self._log_dataset(**payload)
        elif kind == "view":
            self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + payload["key"],
                                           payload["view"])
        elif kind == "model":
            self._log_model(**payload)
        elif kind == "end":
            self.client.set_terminated(self.id, payload["status"], payload["end_time"])
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _log_dataset(self, name: str, source: str, digest: str, context: str):
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = MetaDataset(source=LocalArtifactDatasetSource(source), name=name, digest=digest)
        inputs = [DatasetInput(dataset._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        for attempt in range(5):
            try:
                return self.client.log_inputs(self.id, datasets=inputs)
            except Exception as exc:
                # Runs started together into one store race to register the same dataset: the
                # loser's insert breaks the unique key. Once it exists, logging it again links it.
                if attempt == 4 or not _unique_clash(exc):
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _log_model(self, model: nn.Module, packages: list[str], recipe: Mapping[str, Any] | None,
                   example: Tensor | None, step: int, tags: Mapping[str, str],
                   register: str | None, metrics: Mapping[str, float],
                   dataset: list[str] | None):
        import tempfile

        import mlflow.pytorch
        from mlflow.models import Model

        from . import weights

        signature = None
        if example is not None:
            import torch
            from mlflow.models import infer_signature

            example = example.detach().cpu().float().numpy()
            with torch.no_grad():
                output = model(torch.from_numpy(example)).numpy()
            signature = infer_signature(example, output)
        with tempfile.TemporaryDirectory(prefix="cifarx-model-") as tmp:
            extra = [str(p) for p in weights.save(model, recipe, Path(tmp))] if recipe else None
            # mlflow.pytorch.log_model is this call for the active run; the run named here
            # also works when uploading a spool, with no run active
            info = Model.log(
                artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pytorch, run_id=self.id,
                pytorch_model=model, serialization_format="pickle",
                pip_requirements=requirements_for(model, tuple(packages)), extra_files=extra,
                signature=signature, input_example=example, step=step, tags=dict(tags),
                registered_model_name=register)
        if register and info.registered_model_version is not None:
            version = str(info.registered_model_version)
            describe_version(self.client, register, version, tags.get(NOTE))
            self.registered = (register, version)
        if metrics:
            from mlflow.entities import Metric

            name, digest = dataset or (None, None)
            now = int(time.time() * 1000)
            self.client.log_batch(self.id, metrics=[
                Metric(key, as_logged(value), now, step, dataset_name=name, dataset_digest=digest,
                       run_id=self.id, model_id=info.model_id) for key, value in metrics.items()])


def describe_version(client, name: str, version: str, note: str | None):
    """Give a registered model version its model's description, and the registered model
    too when it has none (its first version)."""
    if not note:
        return
    client.update_model_version(name, version, description=note)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=note)


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
    tags = {**resolve_tags(), **({MLFLOW_PARENT_RUN_ID: parent} if parent else {})}
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


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


def _unique_clash(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a database's unique-constraint violation."""
    while exc is not None:
        if type(exc).__name__ == "IntegrityError" or "UNIQUE constraint failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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


def requirements_for(model: nn.Module, extra: tuple[str, ...] = ()) -> list[str]:
    """Pinned pip requirements for every package whose classes the pickled model holds, and
    the ``extra`` distributions (the plugin packages the run used).

    Given explicitly: letting MLflow infer them took 4 to 15 s per model.
    """
    packages = {"torch", "cifarx"} | {type(m).__module__.split(".")[0] for m in model.modules()}
    packages |= set(extra)
    by_module = _distributions()
    requirements = set()
    for module in sorted(packages):
        for dist in by_module.get(module, [module]):
            try:
                requirements.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return sorted(requirements)


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module -> its distributions; once per process (a second per call: a sweep's
    worker would pay it for every trial)."""
    return importlib.metadata.packages_distributions()


def load_model(uri: str, tracking: str, device: torch.device | str = "cpu",
               trust_pickle: bool = False, catalog=None) -> nn.Module:
    """A model from ``runs:/<id>/model``, ``models:/...`` or a local MLflow model folder,
    rebuilt from its weights (see :mod:`cifarx.weights`); a pickle only if ``trust_pickle``."""
    import tempfile

    import mlflow
    from torch import nn

    from . import weights
    from .registry import catalog as default_catalog

    quiet_mlflow()
    mlflow.set_tracking_uri(tracking)
    local = "://" not in uri and ":/" not in uri
    if local:
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise UserError(f"--model {uri}: no MLflow model there (no MLmodel file); accepted: "
                            "runs:/<run id>/model, models:/<name>/<version>, or a model folder")
    elif uri.startswith("runs:/"):
        check_run_model(uri, tracking)
    with tempfile.TemporaryDirectory(prefix="cifarx-load-") as tmp:
        try:
            if not local:  # downloading reads files; nothing in them runs
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            model = weights.load(path, f"--model {uri}", catalog or default_catalog(), device,
                                 trust_pickle)
        except mlflow.exceptions.MlflowException as exc:
            raise UserError(f"--model {uri}: cannot load it "
                            f"({exc.message.splitlines()[0]})") from None
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
