"""A run being logged: :class:`Run` (params, tags, metrics buffered by a
:class:`MetricLog`, artifacts, figures, the model).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .common import NOTE, VIEW_TAG
from .models import describe_version, requirements_for
from .server import brief_waits, is_outage

if TYPE_CHECKING:
    from torch import Tensor, nn

MODEL_ARTIFACT = "model"

# (key, value, step, timestamp in ms)
Point = tuple[str, float, int, int]


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

    Every method builds a record (see :mod:`cifarx.tracking.spool`) and sends it with
    :meth:`_apply`; a run on a tracking server (``link``) keeps going into a local spool while the
    server is lost. Metrics go through a writer thread, so that training never waits for the store.
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
        """Log params; keys already present (set by ``mlflow run -P``) are left as they are.
        Booleans as ``true``/``false``, as options are written (and shown)."""
        self._send("params", {"params": {k: str(v).lower() if isinstance(v, bool) else str(v)
                                         for k, v in params.items()}})

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

        With a ``recipe`` (see :mod:`cifarx.tracking.weights`), its weights and recipe go into the
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


def _unique_clash(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a database's unique-constraint violation."""
    while exc is not None:
        if type(exc).__name__ == "IntegrityError" or "UNIQUE constraint failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
