"""``cifarx evaluate``: a trained model's test-set report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..inference.report import Report
from ..plugin_api.registry import Catalog
from .analyze import AnalyzeConfig, analyze_run
from .common import Tracking


# --- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateConfig:
    model: str  # runs:/<id>/model, models:/<name>/<version>, or a model folder
    dataset: str | None = None  # None: the dataset the model was trained on
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "auto"
    trust_pickle: bool = False  # load a model that is only a pickle (see cifarx.weights)


@dataclass
class EvaluateRun:
    report: Report
    run_id: str
    experiment_id: str


def evaluate_run(config: EvaluateConfig, tracking: Tracking = Tracking(),
                 catalog: Catalog | None = None) -> EvaluateRun:
    """Test accuracy, per-class accuracy and a confusion matrix of a saved model, as a run:
    :func:`analyze_run` with the ``confusion-matrix`` analysis, in ``precision`` as training
    evaluates."""
    done = analyze_run(AnalyzeConfig(
        config.model, ("confusion-matrix",), dataset=config.dataset, data_dir=config.data_dir,
        dataset_options=config.dataset_options, device=config.device,
        precision=config.precision, trust_pickle=config.trust_pickle), tracking, catalog,
        command="evaluate")
    found = done.findings["confusion-matrix"]
    saved = found.files["confusion_matrix.json"]
    report = Report(found.metrics["test/acc"], found.metrics["test/loss"],
                    tuple(saved["classes"]), np.array(saved["matrix"]))
    return EvaluateRun(report, done.run_id, done.experiment_id)
