"""What every kind of run shares: where it is tracked (:class:`Tracking`), the tags it
carries (:func:`run_tags`, and only there), a model's test data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import __version__
from ..errors import UserError
from ..plugin_api.options import OptionError, flag_label, reword
from ..plugin_api.registry import Catalog
from ..plugin_api.types import ImageData
from ..tracking.common import DEFAULT_EXPERIMENT, data_digest, git_commit, tracking_uri, ui_page
from ..tracking.lifecycle import start_run
from ..tracking.models import source_run_id
from ..tracking.run import Run
from ..training.config import resolve_plugin_options
from ..training.data import only_classes, resolve_data_dir


@dataclass(frozen=True)
class Tracking:
    """Where a run is logged. ``uri`` None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``;
    ``parent``: the id of the run this one is a child of (a sweep's trials); ``tags``: set on
    the run besides cifarx's own (the user's win); ``description``: the run's note in the
    MLflow UI (default: one the command writes); ``system_metrics``: MLflow's CPU, memory and
    GPU sampling; ``params``: logged besides the run's own (a sweep trial's ``axis.*``)."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    parent: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    system_metrics: bool = True
    register_model: str | None = None  # a training's model goes to the Model Registry as this
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_uri(self) -> str:
        return tracking_uri(self.uri)

    def open(self, default_name: str, tags: Mapping[str, str], description: str | None = None,
             existing: str | None = None):
        """Open the run (see :func:`cifarx.tracking.lifecycle.start_run`): cifarx's ``tags`` and the
        user's, the user's description or ``description``; ``existing``: continue that run."""
        return start_run(self.resolved_uri, self.experiment, self.run_name or default_name,
                         {**tags, **self.tags}, self.parent, existing=existing,
                         description=self.description or description,
                         system_metrics=self.system_metrics)


def run_tags(device: torch.device, catalog: Catalog | None = None,
             plugins: Sequence[tuple[str, str]] = (), **more: Any) -> dict[str, str]:
    """The tags of every cifarx run: version, torch, git commit, device, threads; for each
    plugin used, ``cifarx.plugin.<kind>.<name> = <package>==<version>``; and ``more``
    (``arch="table1"`` -> ``cifarx.arch``), leaving out those that are None."""
    tags = {"cifarx.version": __version__, "cifarx.torch": torch.__version__,
            "cifarx.device": str(device), "cifarx.threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        tags["cifarx.gpu"] = torch.cuda.get_device_name(device)
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["cifarx.git_commit"] = commit
    for kind, name in plugins:
        package, version = catalog.origin(kind, name)
        tags[f"cifarx.plugin.{kind}.{name}"] = f"{package}=={version}" if version else package
    tags.update({f"cifarx.{key}": str(value) for key, value in more.items() if value is not None})
    return tags


def third_party(catalog: Catalog, plugins: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The distributions, other than cifarx, that supplied these plugins: pinned in a logged
    model's requirements, since loading it needs them."""
    packages = {catalog.origin(kind, name)[0] for kind, name in plugins}
    return tuple(sorted(p for p in packages if p.lower() != "cifarx"))


def load_test_data(catalog: Catalog, name: str, data_dir: str | None, texts) -> tuple:
    """(the dataset plugin, its data, its resolved options), for commands that use its test set."""
    dataset = catalog.get("dataset", name)
    values = resolve_plugin_options("dataset", dataset, texts)
    try:
        data = dataset.load(resolve_data_dir(data_dir), dataset.splits[0], **values)
    except OptionError as exc:
        raise reword(exc, lambda n: flag_label("--dataset-opt", None, n), values) from None
    return dataset, data, values


def model_classes(model, data: ImageData, flag: str = "--model"
                  ) -> tuple[tuple[str, ...], ImageData]:
    """The classes ``model`` predicts, and ``data`` with only those: a model trained on some
    of the dataset's classes (``--classes cat,dog``) is tested on their images."""
    classes = tuple(getattr(model, "classes", data.classes))
    if len(classes) < len(data.classes) and set(classes) <= set(data.classes):
        data = only_classes(data, classes, flag)
    if len(classes) != len(data.classes):
        raise UserError(f"{flag}: the model predicts {len(classes)} classes, the dataset has "
                        f"{len(data.classes)}")
    return classes, data


def model_run(model_uri: str, uri: str):
    """The MLflow run that logged a model (``runs:/...``, ``models:/NAME/VERSION``), or a run
    given by its id; None when there is none (a model folder, a file)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    run_id = source_run_id(model_uri)
    try:
        if run_id is None and model_uri.startswith("models:/"):
            name, _, version = model_uri[len("models:/"):].partition("/")
            run_id = client.get_model_version(name, version).run_id if version.isdigit() \
                else None
        elif run_id is None and len(model_uri) == 32 and model_uri.isalnum():
            run_id = model_uri  # a run id (an attack run's, for --adversarial)
        return client.get_run(run_id) if run_id else None
    except MlflowException:
        return None


def model_dataset(model_uri: str, uri: str) -> str:
    """The dataset a model was trained on (its run's ``cifarx.dataset`` tag): the default of
    ``--dataset`` for the commands that take ``--model``; cifar10 when the run is unknown (a
    model folder)."""
    run = model_run(model_uri, uri)
    return run.data.tags.get("cifarx.dataset", "cifar10") if run else "cifar10"


def linked(ref: str, run) -> str:
    """``ref`` (a model URI, a run id) for a run's description: a markdown link to the page of
    ``run``, the run it comes from (the MLflow UI opens it), or the ref itself without one."""
    if run is None:
        return f"`{ref}`"
    page = ui_page(run.info.experiment_id, run.info.run_id)
    return f"[{run.info.run_name or run.info.run_id}]({page}) (`{ref}`)"


def log_test_set(run: Run, dataset, data: ImageData):
    """The test split as the run's input (the dataset the training run logs as its test set:
    the same name and digest)."""
    run.log_dataset(f"{dataset.name}-test", data.source,
                    data_digest(data.test_images, data.test_labels), context="test")
