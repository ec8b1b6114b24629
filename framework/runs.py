"""Runs: one function per kind of run, a config in and a result out.

``train_run``, ``evaluate_run``, ``attack_run``, ``transfer_run`` and ``analyze_run`` check
every input before they open an MLflow run (bad input opens none), then log into one run, which
ends FINISHED,
FAILED or KILLED. The CLI, the bench scripts and the tests call these; a sweep calls them with
``Tracking(parent=...)`` to make its trials child runs. The tags every run carries come from
:func:`run_tags`, and only from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from . import __version__, adversarial, analysis, loop, transfer, weights
from .config import Plan, TrainConfig, plan as make_plan, resolve_plugin_options
from .data import resolve_data_dir, resolve_device
from .errors import Diverged, UserError
from .evaluation import Report
from .inference import predict, resolve_precision
from .options import OptionError, flag_label, params as option_params, reword, show
from .plugin_types import ImageData
from .registry import Catalog, catalog as default_catalog
from .tracking import (DEFAULT_EXPERIMENT, NOTE, Run, data_digest, git_commit, load_model,
                       source_run_id, start_run, tracking_uri, ui_page)


PRUNED_TAG = "cifarx.pruned"  # "true" on a run a search's pruner stopped early


@dataclass(frozen=True)
class Tracking:
    """Where a run is logged. ``uri`` None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``;
    ``parent``: the id of the run this one is a child of (a sweep's trials); ``tags``: set on
    the run besides cifarx's own (the user's win); ``description``: the run's note in the
    MLflow UI (default: one the command writes); ``system_metrics``: MLflow's CPU, memory and
    GPU sampling."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    parent: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    system_metrics: bool = True
    register_model: str | None = None  # a training's model goes to the Model Registry as this

    @property
    def resolved_uri(self) -> str:
        return tracking_uri(self.uri)

    def open(self, default_name: str, tags: Mapping[str, str], description: str | None = None,
             existing: str | None = None):
        """Open the run (see :func:`cifarx.tracking.start_run`): cifarx's ``tags`` and the
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


# --- training -------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """A training checked and built, before any run is open: the plan, the data, the model."""

    plan: Plan
    data: ImageData
    setup: loop.Setup
    catalog: Catalog

    @property
    def label(self) -> str:
        """``table1 (flip,normalize,crop)``, and the adversarial training if any."""
        cfg = self.plan.config
        label = f"{cfg.arch} ({','.join(self.plan.pipeline.names)})"
        if self.plan.attack is not None:
            label += f" adv {self.plan.attack.name} {cfg.adv_ratio:g}"
        if self.setup.adv_images is not None:
            label += f" +{len(self.setup.adv_images):,} adv"
        return label

    def warnings(self) -> list[str]:
        if self.setup.adv_images is None:
            return self.plan.warnings()
        return [f"--adv-data: its {len(self.setup.adv_images):,} images are adversarial "
                f"versions of {self.setup.adv_test_images:,} test images; the test accuracy "
                "counts their originals", *self.plan.warnings()]


@dataclass
class TrainRun:
    job: TrainJob
    result: loop.Result
    run_id: str
    experiment_id: str
    model_uri: str
    findings: dict[str, Any] = field(default_factory=dict)  # by analysis, with --analyze
    registered: tuple[str, str] | None = None  # (name, version) in the Model Registry


def prepare_training(config: TrainConfig, catalog: Catalog | None = None,
                     uri: str | None = None, load: Callable[[Plan], ImageData] | None = None
                     ) -> TrainJob:
    """Every check a training needs, the data loaded and the model built; no run opened.
    ``load`` loads the plan's data (default: :meth:`Plan.load_data`; a sweep's workers keep
    what they loaded)."""
    catalog = catalog or default_catalog()
    plan = make_plan(config, catalog)
    data = (load or Plan.load_data)(plan)
    return TrainJob(plan, data, loop.assemble(plan, data, tracking_uri(uri)), catalog)


def train_run(config: TrainConfig | TrainJob, tracking: Tracking = Tracking(),
              listeners: Sequence[loop.Listener] = (), catalog: Catalog | None = None,
              analyses: analysis.AnalysisPlan | None = None,
              resume: tuple[str, dict] | None = None) -> TrainRun:
    """Train and log the run: params, dataset, metrics as they come, figures, the model;
    then ``analyses`` (``--analyze``) on the trained model, into the same run (each checked
    against the model before the run opens).

    Raises :class:`Diverged` when the loss becomes NaN or infinite (the run ends FAILED with
    its metrics and figures, tagged ``cifarx.diverged_at``). A listener's :class:`loop.Stop`
    ends the training early: the run ends FINISHED with what it measured, everything logged as
    usual, tagged ``cifarx.stopped_at`` (and ``cifarx.pruned = true`` for :class:`loop.Pruned`).
    """
    job = config if isinstance(config, TrainJob) else \
        prepare_training(config, catalog, tracking.uri)
    plan, data = job.plan, job.data
    cfg = plan.config
    if analyses is not None:  # --analyze takes no --images: the default, or the whole split
        analyses = replace(analyses, images=min(analyses.images, len(data.test_labels)))
        looked_at = analysis.inputs(analyses, data, plan.device)
        analysis.check(analyses, job.setup.model, looked_at)
    tags = run_tags(plan.device, job.catalog,
                    plan.plugins() + (analyses.plugins() if analyses else []), arch=cfg.arch,
                    aug=",".join(plan.pipeline.names), dataset=plan.dataset.name,
                    adv_train=plan.attack.name if plan.attack else None,
                    adv_data=",".join(cfg.adv_data) or None,
                    analyses=",".join(analyses.names) if analyses else None)
    existing, state = resume or (None, None)
    with tracking.open(job.label, tags, describe(plan), existing) as run:
        if existing is None:  # a resumed run has them already
            added = {} if job.setup.adv_images is None else {
                "adv_data_images": len(job.setup.adv_images),
                "adv_data_test_images": job.setup.adv_test_images}
            if job.setup.split.val_images is not None:
                added["val_images"] = len(job.setup.split.val_images)
            run.log_params({**plan.params(), **added})
            run.log_dataset(f"{plan.dataset.name}-{cfg.train_split}", data.source,
                            data_digest(data.train_images, data.train_labels),
                            context="training")
            run.log_dict(asdict(cfg), "config.json")
        checkpointing = loop.Checkpointing(
            cfg.checkpoint_every, lambda snapshot: save_checkpoint(run, snapshot), state
        ) if cfg.checkpoint_every or state is not None else None
        try:
            result = loop.train(plan, data, job.setup, [run.log_points, *listeners],
                                checkpointing)
        except Diverged as exc:  # the curves up to the divergence are what explains it
            run.set_tags({"cifarx.diverged_at": exc.step})
            log_figures(plan, exc.history, run,
                        f"{cfg.arch}: diverged at iteration {exc.step} (loss {exc.value})")
            raise Diverged(f"{exc}; run {run.id} ends FAILED with its metrics up to there",
                           exc.step, exc.value) from None
        if result.stopped is not None:
            run.set_tags({"cifarx.stopped_at": result.steps, **(
                {PRUNED_TAG: "true"} if isinstance(result.stopped, loop.Pruned) else {})})
        model_uri = finish(job, result, run, tracking.register_model)
        findings = {}
        if analyses is not None:
            run.log_params({**analyses.params(), "analysis_images": len(looked_at.labels)})
            findings = analysis.run(analyses, result.model, looked_at, run, cfg.precision,
                                    result.steps or cfg.iters)
        experiment_id = run.experiment_id
    return TrainRun(job, result, run.id, experiment_id, model_uri, findings, run.registered)


CHECKPOINT = "checkpoints/checkpoint.pt"  # a training run's last checkpoint, as an artifact


def save_checkpoint(run: Run, snapshot: dict):
    """Store the training state as the run's checkpoint (replacing the previous one)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cifarx-checkpoint-") as tmp:
        path = Path(tmp) / Path(CHECKPOINT).name
        torch.save(snapshot, path)
        run.log_artifact(path, str(Path(CHECKPOINT).parent))


def resume_run(run_id: str, tracking: Tracking = Tracking(),
               listeners: Sequence[loop.Listener] = (), catalog: Catalog | None = None
               ) -> TrainRun:
    """Continue the training run ``run_id`` (killed, or stopped by SIGTERM) from its last
    checkpoint, with every option it was started with; its metrics go on at the right steps
    and its run id stays. On the CPU with the same threads and fp32, the result equals an
    uninterrupted training's."""
    job, resume, tracking = prepare_resume(run_id, tracking, catalog)
    return train_run(job, tracking, listeners, resume=resume)


def prepare_resume(run_id: str, tracking: Tracking, catalog: Catalog | None = None,
                   load: Callable[[Plan], ImageData] | None = None
                   ) -> tuple[TrainJob, tuple[str, dict], Tracking]:
    """What :func:`resume_run` trains: the run's job built from its config, the checkpoint,
    the tracking with the run's name; no run opened."""
    import dataclasses
    import json
    import tempfile

    import mlflow

    client = mlflow.MlflowClient(tracking.resolved_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"--resume {run_id}: no such run in {tracking.resolved_uri}") from None
    if run.info.status == "FINISHED":
        raise UserError(f"--resume {run_id}: the run finished; there is nothing to continue")
    names = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    if "config.json" not in names:
        raise UserError(f"--resume {run_id}: not a cifarx training run (no config.json)")
    if CHECKPOINT not in names:
        raise UserError(f"--resume {run_id}: the run has no checkpoint; train with "
                        "--checkpoint-every N to make runs resumable")
    with tempfile.TemporaryDirectory(prefix="cifarx-resume-") as tmp:
        saved = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp))
                           .read_text())
        state = torch.load(client.download_artifacts(run_id, CHECKPOINT, tmp),
                           map_location="cpu", weights_only=True)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in saved.items() if k in fields})
    job = prepare_training(config, catalog, tracking.uri, load)
    return job, (run_id, state), dataclasses.replace(tracking, run_name=run.info.run_name)


def best_metrics(plan: Plan, result: loop.Result) -> dict[str, float]:
    """``best/step`` and ``best/<monitored metric>``: the best evaluation, where the run
    selects one (``--val-split``, ``--early-stop``, ``--keep best``)."""
    if result.best is None:
        return {}
    return {"best/step": result.best[0], f"best/{plan.config.monitor}": result.best[1]}


def log_figures(plan: Plan, history: Mapping[str, list[tuple[int, float]]], run: Run, title: str):
    """The training curves and each probe's figure."""
    from .figures import training_curves

    run.log_figure(training_curves(history, title), "figures/training.png")
    for probe in plan.probes:
        if probe.figure is not None:
            run.log_figure(probe.figure(history), f"figures/{probe.name}.png")


def describe(plan: Plan) -> str:
    """A training run's description: what was trained, on what, how."""
    cfg = plan.config
    return (f"{cfg.arch} trained on {plan.dataset.name} ({cfg.train_split}) with "
            f"{','.join(plan.pipeline.names)}: {cfg.iters} iterations of {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr:g} ({cfg.schedule}), seed {cfg.seed}")


def model_recipe(job: TrainJob) -> dict[str, Any]:
    """What cifarx needs to rebuild the trained model from its weights (:mod:`cifarx.weights`)."""
    plan, normalize = job.plan, job.plan.pipeline.normalize
    origin = {f"{kind}.{name}": "==".join(filter(None, job.catalog.origin(kind, name)))
              for kind, name in [("architecture", plan.arch.name),
                                 ("augmentation", normalize.name)]}
    return weights.recipe(plan.arch.name, plan.arch_options, normalize.name,
                          plan.pipeline.options[normalize.name],
                          tuple(job.data.train_images.shape[1:]), job.data.classes, origin)


FINAL_ARTIFACT = "final.json"  # a training run's timings (final/train_seconds, ...)


def model_note(job: TrainJob, result: loop.Result) -> str:
    """The logged model's description (and its registered version's): what it is, what it
    takes and gives, how well it does."""
    plan, data = job.plan, job.data
    cfg = plan.config
    shape = " x ".join(map(str, data.test_images.shape[1:]))
    return (f"{cfg.arch} trained on {plan.dataset.name} ({cfg.train_split}) with "
            f"{','.join(plan.pipeline.names)}, {result.steps or cfg.iters} iterations of "
            f"{cfg.batch_size}, seed {cfg.seed}.\n\n"
            f"**Input**: float32 N x {shape}, pixels in [0, 1] (the model normalizes them "
            f"itself). **Output**: N x {len(data.classes)} logits, one per class: "
            f"{', '.join(data.classes)}.\n\n"
            f"**Test accuracy** {result.test_acc:.2%} (loss {result.test_loss:.4f}) on the "
            f"{len(data.test_labels):,} {plan.dataset.name} test images.")


def finish(job: TrainJob, result: loop.Result, run: Run, register: str | None = None) -> str:
    """Log the end-of-run summary metrics, the figures and the model; the model's URI.

    The final metrics are logged with the model, on the test set (a dataset of the run);
    the metrics of the last step are linked to the model too; ``register`` adds the model to
    the Model Registry under that name.
    """
    plan, data = job.plan, job.data
    cfg = plan.config
    step = result.steps or cfg.iters
    test = (f"{plan.dataset.name}-test", data_digest(data.test_images, data.test_labels))
    run.log_dataset(test[0], data.source, test[1], context="test")
    # The timings are a table, not metrics: a single value is a chart of one point in the
    # MLflow UI, and "final" charts come before the curves there.
    run.log_dict({"final/train_seconds": result.seconds,
                  "final/images_per_second": result.images_per_second,
                  "iterations": step, "device": str(plan.device), "precision": cfg.precision},
                 FINAL_ARTIFACT)
    title = f"{cfg.arch} ({','.join(plan.pipeline.names)}): final test accuracy " \
            f"{result.test_acc:.2%}"
    if result.stopped is not None:
        title += f" ({result.stopped.reason})"
    log_figures(plan, result.history, run, title)
    run.wait()  # MLflow links to the model the metrics stored at its step
    model = result.model.to("cpu", memory_format=torch.contiguous_format).eval()
    tags = {"cifarx.arch": cfg.arch, "cifarx.dataset": plan.dataset.name,
            "cifarx.aug": ",".join(plan.pipeline.names), NOTE: model_note(job, result)}
    final = {"final/test_acc": result.test_acc, "final/test_loss": result.test_loss,
             **best_metrics(plan, result)}
    return run.log_model(model, third_party(job.catalog, plan.plugins()), model_recipe(job),
                         data.test_images[:2].float() / 255, step, tags, register, final, test)


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


def load_test_data(catalog: Catalog, name: str, data_dir: str | None, texts) -> tuple:
    """(the dataset plugin, its data, its resolved options), for commands that use its test set."""
    dataset = catalog.get("dataset", name)
    values = resolve_plugin_options("dataset", dataset, texts)
    try:
        data = dataset.load(resolve_data_dir(data_dir), dataset.splits[0], **values)
    except OptionError as exc:
        raise reword(exc, lambda n: flag_label("--dataset-opt", None, n), values) from None
    return dataset, data, values


def model_classes(model, data: ImageData, flag: str = "--model") -> tuple[str, ...]:
    classes = tuple(getattr(model, "classes", data.classes))
    if len(classes) != len(data.classes):
        raise UserError(f"{flag}: the model predicts {len(classes)} classes, the dataset has "
                        f"{len(data.classes)}")
    return classes


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


# --- analyses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeConfig:
    """``cifarx analyze``. ``analysis_options`` are ``ANALYSIS.NAME=VALUE`` texts."""

    model: str | None = None  # None with ``adversarial``: the model the set was made on
    analyses: tuple[str, ...] = ()
    analysis_options: tuple[str, ...] = ()
    images: int = analysis.DEFAULT_IMAGES
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


def analyze_run(config: AnalyzeConfig, tracking: Tracking = Tracking(),
                catalog: Catalog | None = None,
                on_done: Callable[[str, Any, float], None] | None = None,
                command: str = "analyze") -> AnalyzeRun:
    """Analyses of a saved model, or of a stored adversarial set and its model, as a run
    tagged ``cifarx.source_run``: every check first (names, options, the model, the data,
    each analysis's own check), then one run. ``on_done(name, findings, seconds)`` hears
    each analysis as it ends."""
    catalog = catalog or default_catalog()
    chosen = analysis.plan(catalog, config.analyses, config.analysis_options, config.images,
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
    model_classes(model, data)
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


# --- attacks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackConfig:
    """``cifarx attack``. ``attack_options`` are ``NAME=VALUE`` texts; ``option_flags`` names
    the flag that set an option when it is not ``--attack-opt`` (``{"eps": "--eps"}``)."""

    model: str
    attack: str = "ifgsm"
    attack_options: tuple[str, ...] = ()
    option_flags: Mapping[str, str] = field(default_factory=dict)
    per_class: int | None = None
    count: int | None = None
    all_test: bool = False
    replace: bool = True  # --per-class: an image that fails is replaced by the next of its class
    batch_size: int = 500
    dataset: str | None = None  # None: the dataset the model was trained on
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    seed: int = 0
    trust_pickle: bool = False


@dataclass
class AttackRun:
    adv_set: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    experiment_id: str


def attack_run(config: AttackConfig, tracking: Tracking = Tracking(),
               catalog: Catalog | None = None,
               on_start: Callable[[int, torch.device], None] | None = None) -> AttackRun:
    """Adversarial images for test images the model gets right: every check first, then one
    run linked to the model's run. ``on_start`` hears how many images, once the run is open."""
    catalog = catalog or default_catalog()
    attack = catalog.get("attack", config.attack)
    how = adversarial.selection(config.per_class, config.count, config.all_test)
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    label = lambda name: config.option_flags.get(name) or flag_label(  # noqa: E731
        "--attack-opt", None, name)
    values = resolve_plugin_options("attack", attack, config.attack_options, label)
    device = resolve_device(config.device)
    uri = tracking.resolved_uri
    model = adversarial.for_attack(load_model(config.model, uri, device, config.trust_pickle,
                                              catalog))
    dataset_name = config.dataset or model_dataset(config.model, uri)
    dataset, data, dataset_values = load_test_data(catalog, dataset_name, config.data_dir,
                                                   config.dataset_options)
    classes = model_classes(model, data)
    if values.get("target") is not None:
        values["target"] = adversarial.resolve_target(values["target"], classes,
                                                      label("target"))
    try:
        run_attack = attack.build(model, **values)
    except OptionError as exc:
        raise reword(exc, label, values) from None
    fixed = values.get("target")
    skip = fixed if isinstance(fixed, int) and not isinstance(fixed, bool) else None
    predicted = predict(model, data.test_images, device).argmax(1).cpu()
    indices, spares = adversarial.choose(predicted, data.test_labels, classes, how, config.seed,
                                         skip)
    if not config.replace:
        spares = {}

    source = model_run(config.model, uri)
    tags = run_tags(device, catalog, [("attack", attack.name), ("dataset", dataset.name)],
                    attack=attack.name, model_uri=config.model, dataset=dataset.name,
                    source_run=source.info.run_id if source else None)
    params = {"attack": attack.name, **option_params("attack", values),
              "model": config.model, "dataset": dataset.name,
              "data_dir": str(resolve_data_dir(config.data_dir)),
              "images": len(indices), "selection": how[0] if how[0] == "all"
              else f"{how[0]}={how[1]}", "seed": config.seed, "batch_size": config.batch_size,
              "replace": show(config.replace and how[0] == "per_class"),
              "device": str(device), "threads": torch.get_num_threads(),
              **option_params("dataset", dataset_values)}
    with tracking.open(f"{attack.name} {config.model}", tags,
                       f"{attack.name} attack on {len(indices)} {dataset.name} test images "
                       f"against the model of {linked(config.model, source)}") as run:
        log_test_set(run, dataset, data)
        if on_start is not None:
            on_start(len(indices), device)
        result, indices, replaced, seconds = adversarial.attack_images(
            run_attack, data.test_images, data.test_labels, indices, spares, device,
            config.batch_size, config.seed)
        images, labels = data.test_images[indices], data.test_labels[indices]
        adv_set = adversarial.make_set(model, [result], images, labels, indices, device, classes,
                                       attack.name, values, config.model, len(indices))
        metrics = {**adversarial.summary(adv_set, seconds), "attack/replaced": replaced}
        adversarial.log_attack(run, adv_set, metrics, params)
        experiment_id = run.experiment_id
    return AttackRun(adv_set, metrics, run.id, experiment_id)


# --- transfer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferConfig:
    adversarial: tuple[str, ...]  # attack run ids, or set.pt files
    models: tuple[str, ...]  # target model URIs
    device: str = "auto"
    trust_pickle: bool = False


@dataclass
class TransferRun:
    sources: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    cells: list[dict[str, Any]]
    run_id: str
    experiment_id: str


def transfer_run(config: TransferConfig, tracking: Tracking = Tracking()) -> TransferRun:
    """Each stored set against each target model, logged as one run."""
    import mlflow

    uri = tracking.resolved_uri
    device = resolve_device(config.device)
    refs, model_uris = list(dict.fromkeys(config.adversarial)), list(dict.fromkeys(config.models))
    sets = [transfer.load_set(ref, uri) for ref in refs]
    models = [adversarial.for_attack(load_model(m, uri, device, config.trust_pickle))
              for m in model_uris]
    for ref, adv_set in zip(refs, sets):
        for m, model in zip(model_uris, models):
            classes = getattr(model, "classes", None)
            if classes is not None and len(classes) != len(adv_set["classes"]):
                raise UserError(f"--model {m} predicts {len(classes)} classes; the set of "
                                f"{ref} has {len(adv_set['classes'])}")
    client = mlflow.MlflowClient(uri)
    keys: set[str] = set()
    sources = [{"key": transfer.short_key(ref, keys), "ref": ref, "attack": s["attack"],
                "model_uri": s["model_uri"], "images": len(s["labels"])}
               for ref, s in zip(refs, sets)]
    for source in sources:
        source["label"] = f"{source['attack']} {source['key']} on " \
                          f"{transfer.describe_model(source['model_uri'], client)}"
    targets = [{"key": transfer.short_key(m, keys), "model_uri": m,
                "label": transfer.describe_model(m, client)} for m in model_uris]
    tags = run_tags(device, adversarial_runs=",".join(refs), target_models=",".join(model_uris),
                    source_run=refs[0] if len(refs) == 1 else None)
    with tracking.open(f"transfer {len(refs)} set(s) to {len(model_uris)} model(s)", tags,
                       f"Adversarial sets {', '.join(refs)} fed to "
                       f"{', '.join(model_uris)}") as run:
        run.log_params({**{f"adversarial.{s['key']}": s["ref"] for s in sources},
                        **{f"model.{t['key']}": t["model_uri"] for t in targets},
                        "device": str(device)})
        cells = [{"source": s["key"], "target": t["key"],
                  **transfer.transfer_scores(adv_set, model, device)}
                 for s, adv_set in zip(sources, sets) for t, model in zip(targets, models)]
        transfer.log_transfer(run, sources, targets, cells)
        experiment_id = run.experiment_id
    return TransferRun(sources, targets, cells, run.id, experiment_id)
