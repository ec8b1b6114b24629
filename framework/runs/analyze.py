"""``cifarx analyze``: analysis plugins run on a trained model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..errors import UserError
from ..inference import analysis, transfer
from ..inference.predict import resolve_precision
from ..plugin_api.options import params as option_params
from ..plugin_api.registry import Catalog, catalog as default_catalog
from ..tracking.models import load_model
from ..training.data import resolve_data_dir, resolve_device
from .common import (Tracking, linked, load_test_data, log_test_set, model_classes, model_dataset,
                     model_run, run_tags)


# --- analyses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeConfig:
    """``cifarx analyze``. ``analysis_options`` are ``ANALYSIS.NAME=VALUE`` texts."""

    model: str | None = None  # None with ``adversarial``: the model the set was made on
    analyses: tuple[str, ...] = ()
    analysis_options: tuple[str, ...] = ()
    images: int | None = None  # None: DEFAULT_IMAGES, or the whole test split if smaller
    seed: int = 0
    adversarial: str | None = None  # an attack run's id, or a set.pt file
    dataset: str | None = None  # None: the dataset the model was trained on
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "fp32"  # of the test split's logits; attributions are always float32
    trust_pickle: bool = False


@dataclass
class AnalyzeRun:
    findings: dict[str, Any]  # by analysis: its Findings
    images: int  # how many images the analyses were given
    run_id: str
    experiment_id: str


def analyze_run(config: AnalyzeConfig, tracking: Tracking = Tracking(),
                catalog: Catalog | None = None,
                on_done: Callable[[str, Any, float], None] | None = None,
                command: str = "analyze") -> AnalyzeRun:
    """Analyses of a saved model, or of a stored adversarial set and its model, as a run
    tagged ``cifarx.source_run``: every check first (names, options, the model, the data,
    each analysis's own check), then one run. ``on_done(name, findings, seconds)`` hears
    each analysis as it ends."""
    catalog = catalog or default_catalog()
    chosen = analysis.plan(catalog, config.analyses, config.analysis_options,
                           analysis.DEFAULT_IMAGES if config.images is None else config.images,
                           config.seed, adversarial=config.adversarial is not None)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    uri = tracking.resolved_uri
    adv_set = transfer.load_set(config.adversarial, uri) if config.adversarial else None
    model_uri = config.model or (adv_set["model_uri"] if adv_set is not None else None)
    if not model_uri:
        raise UserError("--model: name the model to analyze (runs:/<run id>/model, "
                        "models:/<name>/<version> or a model folder); with --adversarial it "
                        "defaults to the model the set was made on")
    model = load_model(model_uri, uri, device, config.trust_pickle, catalog)
    dataset_name = config.dataset or model_dataset(model_uri, uri)
    dataset, data, values = load_test_data(catalog, dataset_name, config.data_dir,
                                           config.dataset_options)
    _, data = model_classes(model, data)
    if config.images is None:
        chosen = replace(chosen, images=min(chosen.images, len(data.test_labels)))
    if adv_set is not None and (list(adv_set["classes"]) != list(data.classes) or tuple(
            adv_set["images"].shape[1:]) != tuple(data.test_images.shape[1:])):
        raise UserError(f"--adversarial {config.adversarial}: the set's images or classes are "
                        f"not those of the {dataset.name} test split")
    looked_at = analysis.inputs(chosen, data, device, adv_set)
    analysis.check(chosen, model, looked_at)
    source = model_run(model_uri, uri)
    tags = run_tags(device, catalog, [("dataset", dataset.name), *chosen.plugins()],
                    dataset=dataset.name, model_uri=model_uri,
                    source_run=source.info.run_id if source else None,
                    analyses=",".join(chosen.names), adversarial_run=config.adversarial)
    of = f"the adversarial set {linked(config.adversarial, model_run(config.adversarial, uri))}" \
        " on " if adv_set is not None else ""
    with tracking.open(f"{command} {model_uri}", tags,
                       f"{', '.join(chosen.names)} of {of}the model of "
                       f"{linked(model_uri, source)} on the {dataset.name} test set") as run:
        log_test_set(run, dataset, data)
        run.log_params({"model": model_uri, "dataset": dataset.name,
                        "data_dir": str(resolve_data_dir(config.data_dir)),
                        "images": len(looked_at.labels), "seed": config.seed,
                        **({"adversarial": config.adversarial} if config.adversarial else {}),
                        "precision": precision, "device": str(device),
                        "threads": torch.get_num_threads(), **chosen.params(),
                        **option_params("dataset", values)})
        found = analysis.run(chosen, model, looked_at, run, precision, on_done=on_done)
        experiment_id = run.experiment_id
    return AnalyzeRun(found, len(looked_at.labels), run.id, experiment_id)
