"""Runs: one function per kind of run, a config in and a result out.

``train_run``, ``evaluate_run``, ``attack_run`` and ``transfer_run`` check every input before
they open an MLflow run (bad input opens none), then log into one run, which ends FINISHED,
FAILED or KILLED. The CLI, the bench scripts and the tests call these; a sweep calls them with
``Tracking(parent=...)`` to make its trials child runs. The tags every run carries come from
:func:`run_tags`, and only from there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import __version__, adversarial, loop, transfer
from .config import Plan, TrainConfig, plan as make_plan, resolve_plugin_options
from .data import resolve_data_dir, resolve_device
from .errors import Diverged, UserError
from .evaluation import Report, confusion
from .inference import predict, resolve_precision
from .options import OptionError, flag_label, params as option_params, reword
from .plugin_types import ImageData
from .registry import Catalog, catalog as default_catalog
from .tracking import (DEFAULT_EXPERIMENT, Run, data_digest, git_commit, load_model,
                       source_run_id, start_run, tracking_uri)


PRUNED_TAG = "cifarx.pruned"  # "true" on a run a search's pruner stopped early


@dataclass(frozen=True)
class Tracking:
    """Where a run is logged. ``uri`` None: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``;
    ``parent``: the id of the run this one is a child of (a sweep's trials); ``tags``: set on
    the run besides cifarx's own."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    parent: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def resolved_uri(self) -> str:
        return tracking_uri(self.uri)


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
            return []
        return [f"--adv-data: its {len(self.setup.adv_images):,} images are adversarial "
                f"versions of {self.setup.adv_test_images:,} test images; the test accuracy "
                "counts their originals"]


@dataclass
class TrainRun:
    job: TrainJob
    result: loop.Result
    run_id: str
    experiment_id: str
    model_uri: str


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
              listeners: Sequence[loop.Listener] = (), catalog: Catalog | None = None
              ) -> TrainRun:
    """Train and log the run: params, dataset, metrics as they come, figures, the model.

    Raises :class:`Diverged` when the loss becomes NaN or infinite (the run ends FAILED with
    its metrics and figures, tagged ``cifarx.diverged_at``). A listener's :class:`loop.Stop`
    ends the training early: the run ends FINISHED with what it measured, everything logged as
    usual, tagged ``cifarx.stopped_at`` (and ``cifarx.pruned = true`` for :class:`loop.Pruned`).
    """
    job = config if isinstance(config, TrainJob) else \
        prepare_training(config, catalog, tracking.uri)
    plan, data = job.plan, job.data
    cfg = plan.config
    tags = run_tags(plan.device, job.catalog, plan.plugins(), arch=cfg.arch,
                    aug=",".join(plan.pipeline.names), dataset=plan.dataset.name,
                    adv_train=plan.attack.name if plan.attack else None,
                    adv_data=",".join(cfg.adv_data) or None)
    with start_run(tracking.resolved_uri, tracking.experiment, tracking.run_name or job.label,
                   {**tags, **tracking.tags}, tracking.parent) as run:
        added = {} if job.setup.adv_images is None else {
            "adv_data_images": len(job.setup.adv_images),
            "adv_data_test_images": job.setup.adv_test_images}
        run.log_params({**plan.params(), **added})
        run.log_dataset(f"{plan.dataset.name}-{cfg.train_split}", data.source,
                        data_digest(data.train_images, data.train_labels), context="training")
        run.log_dict(asdict(cfg), "config.json")
        try:
            result = loop.train(plan, data, job.setup, [run.log_points, *listeners])
        except Diverged as exc:  # the curves up to the divergence are what explains it
            run.set_tags({"cifarx.diverged_at": exc.step})
            log_figures(plan, exc.history, run,
                        f"{cfg.arch}: diverged at iteration {exc.step} (loss {exc.value})")
            raise Diverged(f"{exc}; run {run.id} ends FAILED with its metrics up to there",
                           exc.step, exc.value) from None
        if result.stopped is not None:
            run.set_tags({"cifarx.stopped_at": result.steps, **(
                {PRUNED_TAG: "true"} if isinstance(result.stopped, loop.Pruned) else {})})
        model_uri = finish(plan, result, run, third_party(job.catalog, plan.plugins()))
        experiment_id = run.experiment_id
    return TrainRun(job, result, run.id, experiment_id, model_uri)


def log_figures(plan: Plan, history: Mapping[str, list[tuple[int, float]]], run: Run, title: str):
    """The training curves and each probe's figure."""
    from .figures import training_curves

    run.log_figure(training_curves(history, title), "figures/training.png")
    for probe in plan.probes:
        if probe.figure is not None:
            run.log_figure(probe.figure(history), f"figures/{probe.name}.png")


def finish(plan: Plan, result: loop.Result, run: Run, packages: tuple[str, ...]) -> str:
    """Log the end-of-run summary metrics, the figures and the model; the model's URI."""
    now = int(time.time() * 1000)
    run.log_points([(key, value, result.steps or plan.config.iters, now) for key, value in {
        "final/test_acc": result.test_acc, "final/test_loss": result.test_loss,
        "final/train_seconds": result.seconds, "final/images_per_second": result.images_per_second,
    }.items()])
    title = f"{plan.config.arch} ({','.join(plan.pipeline.names)}): final test accuracy " \
            f"{result.test_acc:.2%}"
    if result.stopped is not None:
        title += f" ({result.stopped.reason})"
    log_figures(plan, result.history, run, title)
    model = result.model.to("cpu", memory_format=torch.contiguous_format).eval()
    return run.log_model(model, packages)


# --- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateConfig:
    model: str  # runs:/<id>/model, models:/<name>/<version>, or a model folder
    dataset: str = "cifar10"
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "auto"


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
    """Test accuracy, per-class accuracy and a confusion matrix of a saved model, as a run."""
    from .figures import confusion_matrix

    catalog = catalog or default_catalog()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    uri = tracking.resolved_uri
    dataset, data, values = load_test_data(catalog, config.dataset, config.data_dir,
                                           config.dataset_options)
    model = load_model(config.model, uri, device)
    model_classes(model, data)
    tags = run_tags(device, catalog, [("dataset", dataset.name)], dataset=dataset.name,
                    model_uri=config.model, source_run=source_run_id(config.model))
    with start_run(uri, tracking.experiment, tracking.run_name or f"evaluate {config.model}",
                   tags, tracking.parent) as run:
        logits = predict(model, data.test_images, device, precision, fold=True)
        report = confusion(logits, data.test_labels.to(device), data.classes)
        run.log_params({"model": config.model, "dataset": dataset.name, "precision": precision,
                        "device": str(device), "data_dir": str(resolve_data_dir(config.data_dir)),
                        **option_params("dataset", values)})
        now = int(time.time() * 1000)
        points = [("test/acc", report.accuracy, 0, now), ("test/loss", report.loss, 0, now)]
        points += [(f"test/acc/{name}", value, 0, now) for name, value in report.per_class.items()]
        run.log_points(points)
        run.log_dict({"classes": list(data.classes), "matrix": report.matrix.tolist()},
                     "confusion_matrix.json")
        run.log_figure(confusion_matrix(report.matrix, data.classes,
                                        f"test accuracy {report.accuracy:.2%}"),
                       "figures/confusion_matrix.png")
        experiment_id = run.experiment_id
    return EvaluateRun(report, run.id, experiment_id)


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
    dataset: str = "cifar10"
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    seed: int = 0


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
    model = adversarial.for_attack(load_model(config.model, uri, device))
    dataset, data, dataset_values = load_test_data(catalog, config.dataset, config.data_dir,
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

    tags = run_tags(device, catalog, [("attack", attack.name), ("dataset", dataset.name)],
                    attack=attack.name, model_uri=config.model, dataset=dataset.name,
                    source_run=source_run_id(config.model))
    params = {"attack": attack.name, **option_params("attack", values),
              "model": config.model, "dataset": dataset.name,
              "data_dir": str(resolve_data_dir(config.data_dir)),
              "images": len(indices), "selection": how[0] if how[0] == "all"
              else f"{how[0]}={how[1]}", "seed": config.seed, "batch_size": config.batch_size,
              "replace": config.replace and how[0] == "per_class",
              "device": str(device), "threads": torch.get_num_threads(),
              **option_params("dataset", dataset_values)}
    name = tracking.run_name or f"{attack.name} {config.model}"
    with start_run(uri, tracking.experiment, name, tags, tracking.parent) as run:
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
    models = [adversarial.for_attack(load_model(m, uri, device)) for m in model_uris]
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
    name = tracking.run_name or f"transfer {len(refs)} set(s) to {len(model_uris)} model(s)"
    with start_run(uri, tracking.experiment, name, tags, tracking.parent) as run:
        run.log_params({**{f"adversarial.{s['key']}": s["ref"] for s in sources},
                        **{f"model.{t['key']}": t["model_uri"] for t in targets},
                        "device": str(device)})
        cells = [{"source": s["key"], "target": t["key"],
                  **transfer.transfer_scores(adv_set, model, device)}
                 for s, adv_set in zip(sources, sets) for t, model in zip(targets, models)]
        transfer.log_transfer(run, sources, targets, cells)
        experiment_id = run.experiment_id
    return TransferRun(sources, targets, cells, run.id, experiment_id)
