"""Training runs: :func:`train_run`, and :func:`resume_run`, which continues one from its
last checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import Diverged, UserError
from ..inference import analysis
from ..plugin_api.registry import Catalog, catalog as default_catalog
from ..plugin_api.types import ImageData
from ..tracking import weights
from ..tracking.common import NOTE, data_digest, tracking_uri
from ..tracking.run import Run
from ..training import finetune, loop
from ..training.config import Plan, TrainConfig, plan as make_plan
from .common import Tracking, run_tags, third_party

PRUNED_TAG = "cifarx.pruned"  # "true" on a run a search's pruner stopped early


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
            added.update(finetune.counts(job.setup.model.net))
            if cfg.classes:  # by name, as resolved: "3" is cat
                added["classes"] = ",".join(data.classes)
            run.log_params({**plan.params(), **added, **tracking.params})
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
    from ..figures import training_curves

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
    """What cifarx needs to rebuild the trained model from its weights
    (:mod:`cifarx.tracking.weights`)."""
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
