"""``cifarx evaluate`` and ``cifarx analyze``: a trained model's report and analyses."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..tracking.common import DEFAULT_EXPERIMENT
from ..training.config import parse_list
from .common import (MODEL_HELP, AnalysisOpt, DataDir, DatasetOpt, Description, Device, Experiment,
                     ModelDataset, Precision, RunName, SystemMetrics, Tag, Threads, TrackingUri,
                     TrustPickle, _open_hint, _print_findings, _threads, _tracking, command,
                     plugins_catalog)


@command
def evaluate(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    dataset: ModelDataset = None,
    dataset_opt: DatasetOpt = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: Threads = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    description: Description = None,
    tag: Tag = None,
    system_metrics: SystemMetrics = True,
    trust_pickle: TrustPickle = False,
):
    """Test accuracy, per-class accuracy and a confusion matrix, logged as a run (`cifarx
    analyze --analysis confusion-matrix`, in --precision as training evaluates)."""
    from .. import runs
    from .console import out

    _threads(threads)
    config = runs.EvaluateConfig(model, dataset, str(data_dir) if data_dir else None,
                                 tuple(dataset_opt or ()), device, precision, trust_pickle)
    tracking = _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics)
    done = runs.evaluate_run(config, tracking, plugins_catalog())
    report = done.report
    out.print(report.table())
    out.print(f"test accuracy [bold green]{report.accuracy:.2%}[/] (loss {report.loss:.3f}); "
              f"run {done.run_id}", highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)


@command
def analyze(
    analysis: Annotated[str, typer.Option(
        help="Comma list of analyses: confusion-matrix, per-class, calibration, errors, "
             "saliency, guided-backprop, grad-cam, integrated-gradients, embedding, filters, "
             "... (`cifarx plugins`).")],
    model: Annotated[Optional[str], typer.Option(
        help="The model: " + MODEL_HELP + " With --adversarial, default: the model the set was "
             "made on.", show_default=False)] = None,
    analysis_opt: AnalysisOpt = None,
    images: Annotated[int, typer.Option(
        help="Test images for the galleries, attributions and embedding, the same number of "
             "each class, chosen by --seed (confusion-matrix, per-class and calibration use "
             "the whole test split).")] = 100,
    adversarial: Annotated[Optional[str], typer.Option(
        help="Run id of a `cifarx attack` run (or a set.pt file): the attributions map its "
             "adversarial images next to their originals (up to --images of them).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(
        help="Seed that chooses the images, and of t-SNE and the sanity check's random "
             "weights.")] = 0,
    dataset: ModelDataset = None,
    dataset_opt: DatasetOpt = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    threads: Threads = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    description: Description = None,
    tag: Tag = None,
    system_metrics: SystemMetrics = True,
    trust_pickle: TrustPickle = False,
):
    """Look inside a model: attributions (Captum), embeddings, errors, calibration, ...;
    a run linked to the model's run."""
    from .. import runs
    from .console import out

    _threads(threads)
    config = runs.AnalyzeConfig(
        model=model, analyses=parse_list(analysis), analysis_options=tuple(analysis_opt or ()),
        images=images, seed=seed, adversarial=adversarial, dataset=dataset,
        data_dir=str(data_dir) if data_dir else None, dataset_options=tuple(dataset_opt or ()),
        device=device, trust_pickle=trust_pickle)
    tracking = _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics)
    done = runs.analyze_run(config, tracking,
                            plugins_catalog(), lambda name, found, seconds:
                            _print_findings(name, found, seconds))
    out.print(f"run {done.run_id} ({done.images} images)", highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)
