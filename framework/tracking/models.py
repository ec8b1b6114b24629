"""Models in and out of MLflow: the requirements logged with a model, its registered
version's description, :func:`load_model` (weights first; a pickle only when trusted)
and the checks of a ``runs:/`` model URI.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..errors import UserError
from .common import quiet_mlflow

if TYPE_CHECKING:
    import torch
    from torch import nn


def describe_version(client, name: str, version: str, note: str | None):
    """Give a registered model version its model's description, and the registered model
    too when it has none (its first version)."""
    if not note:
        return
    client.update_model_version(name, version, description=note)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=note)


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


_handing_over = threading.Lock()


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module -> its distributions, as MLflow maps them.

    MLflow builds this map whenever it logs a model (to check the pinned requirements against
    what is installed) by reading every installed distribution's file list: 0.8 s of each run.
    The scan's result is kept on disk under a fingerprint of the installed distributions
    (:func:`_installed`) and handed to MLflow, so an environment pays the scan once, and
    cifarx and MLflow share one map.
    """
    try:
        from mlflow.utils import requirements_utils as mlflow_requirements

        metadata = mlflow_requirements.importlib_metadata
        with _handing_over:  # two threads swapping at once could leave the stand-in there
            if mlflow_requirements._MODULES_TO_PACKAGES is None:
                scan = metadata.packages_distributions
                found = _cached_scan(scan)
                metadata.packages_distributions = lambda: found  # what scan() gives here
                try:
                    mlflow_requirements._init_modules_to_packages_map()
                finally:
                    metadata.packages_distributions = scan
        if isinstance(mlflow_requirements._MODULES_TO_PACKAGES, dict):
            return mlflow_requirements._MODULES_TO_PACKAGES
    except (ImportError, AttributeError):  # another MLflow: a scan of our own
        pass
    return importlib.metadata.packages_distributions()


def _cached_scan(scan) -> Mapping[str, list[str]]:
    """``scan()``, read from the cache when the installed distributions are those it was
    made with, else made and stored (atomically: sweep workers start together)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "cifarx",
                 f"distributions-{_installed()}.json")
    try:
        found = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    else:
        try:
            os.utime(cache)  # in use: kept by the pruning below
        except OSError:  # a cache others made, read-only here: still a hit
            pass
        return found
    found = {module: list(dists) for module, dists in scan().items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(found))  # in order: MLflow inverts it
        partial.replace(cache)
        _prune(cache.parent)
    except OSError:  # a read-only home: scan each time
        pass
    return found


def _prune(folder: Path, days: float = 30) -> None:
    """Drop the maps no environment has used for ``days`` (each install makes a new one;
    several virtual environments share the folder, so the others' are not dropped at once)."""
    stale = time.time() - days * 86400
    for old in folder.glob("distributions-*.json"):
        try:
            if old.stat().st_mtime < stale:
                old.unlink()
        except OSError:  # another process pruned it first
            pass


def _installed() -> str:
    """A fingerprint of the installed distributions: the metadata folders on ``sys.path``
    with their times (an install, upgrade or removal changes one), in a few milliseconds."""
    digest = hashlib.sha256()
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as found:
                folders = sorted((e.name, e.stat().st_mtime_ns) for e in found
                                 if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        if folders:  # the working directory (sys.path's '') holds none, wherever it is
            digest.update(repr((entry, folders)).encode())
    return digest.hexdigest()[:16]


def load_model(uri: str, tracking: str, device: torch.device | str = "cpu",
               trust_pickle: bool = False, catalog=None) -> nn.Module:
    """A model from ``runs:/<id>/model``, ``models:/...`` or a local MLflow model folder,
    rebuilt from its weights (see :mod:`cifarx.tracking.weights`); a pickle only if
    ``trust_pickle``."""
    import tempfile

    import mlflow
    from torch import nn

    from ..plugin_api.registry import catalog as default_catalog
    from . import weights

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
