"""``cifarx train``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..tracking.common import DEFAULT_EXPERIMENT
from ..training.checks import KEEPS, MONITORS
from ..training.config import ADV_RATIO, TrainConfig, parse_list
from ..training.optim import DEFAULTS, OPTIMIZERS, SCHEDULES
from .common import (PER_ARCH, AnalysisOpt, ArchOpt, AttackOpt, AugOpt, DataDir, DatasetName,
                     DatasetOpt, Description, Device, Experiment, Precision, ProbeOpt, RunName,
                     Seed, SystemMetrics, Tag, Threads, TrackingUri, _open_hint, _print_findings,
                     _tracking, command, plugins_catalog)


@command
def train(
    arch: Annotated[str, typer.Option(help="Architecture plugin (see `cifarx plugins`).")] = "table1",
    aug: Annotated[str, typer.Option(
        help="Comma list of augmentation plugins; normalize is implied unless another "
             "normalization (raw) is named; the plugins' stages fix the order.")] = "flip,crop",
    aug_opt: AugOpt = None,
    dataset: DatasetName = "cifar10",
    dataset_opt: DatasetOpt = None,
    train_split: Annotated[Optional[str], typer.Option(
        help="Training images: one of the dataset's splits (default: its first; cifar10: "
             "batch1, the 10,000 of train batch #1, or all, 50,000).", show_default=False)] = None,
    classes: Annotated[Optional[str], typer.Option(
        help="Train and test on these classes only, a comma list of the dataset's class names "
             "or numbers (cat,dog), relabelled in that order: a task of its own, or the source "
             "task of a transfer (--init-from).", show_default=False)] = None,
    data_dir: DataDir = None,
    iters: Annotated[int, typer.Option(help="Training iterations.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per iteration.")] = 100,
    eval_every: Annotated[int, typer.Option(
        help="Evaluate on the test set every N iterations (an 'epoch').")] = 100,
    optimizer: Annotated[Optional[str], typer.Option(
        help=f"{', '.join(OPTIMIZERS)} " + PER_ARCH.format(DEFAULTS['optimizer']),
        show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate " + PER_ARCH.format(DEFAULTS['lr']), show_default=False)] = None,
    momentum: Annotated[Optional[float], typer.Option(
        help="Momentum (sgd, nesterov, rmsprop) " + PER_ARCH.format(DEFAULTS['momentum']),
        show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="L2 weight decay " + PER_ARCH.format(DEFAULTS['weight_decay']),
        show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(
        help=f"Learning-rate schedule: {', '.join(SCHEDULES)} "
             + PER_ARCH.format(DEFAULTS['schedule']), show_default=False)] = None,
    arch_opt: ArchOpt = None,
    pretrained: Annotated[bool, typer.Option(
        "--pretrained", help="Start from pretrained weights (timm:<model>; inputs resized to "
        "the weights' size); same as --arch-opt pretrained=true.")] = False,
    probe: Annotated[str, typer.Option(
        help="Comma list of probe plugins to record: grad-max, grad-norm, ...")] = "",
    probe_opt: ProbeOpt = None,
    adv_train: Annotated[Optional[str], typer.Option(
        help="Adversarial training: an attack plugin (fgsm, pgd, ...) that makes, at each "
             "iteration, adversarial versions of part of the batch from the current model; "
             "they replace those images, with their true labels.", show_default=False)] = None,
    adv_ratio: Annotated[Optional[float], typer.Option(
        help=f"With --adv-train: the fraction of each batch replaced, in (0, 1] (default "
             f"{ADV_RATIO}).", show_default=False)] = None,
    attack_opt: AttackOpt = None,
    adv_data: Annotated[Optional[list[str]], typer.Option(
        help="Run id of a `cifarx attack` run (or a set.pt file) whose adversarial images join "
             "the training data with their true labels; repeatable, or a comma list.",
        show_default=False)] = None,
    init_from: Annotated[Optional[str], typer.Option(
        help="Start from this trained model's weights (runs:/<run id>/model, models:/NAME/N, "
             "a model folder), tensor by tensor where name and shape agree: a head for "
             "another number of classes starts fresh (CIFAR-10 -> CIFAR-100).",
        show_default=False, metavar="MODEL")] = None,
    freeze: Annotated[Optional[str], typer.Option(
        help="Parameters that do not train, a comma list: backbone (every one but the "
             "classifier head's: feature extraction) or glob patterns of parameter names "
             "(features.*, conv1). Their BatchNorm statistics stay as loaded.",
        show_default=False)] = None,
    lr_backbone: Annotated[Optional[float], typer.Option(
        help="Fine-tuning: the learning rate of every parameter but the head's (the head "
             "trains at --lr; the schedule scales both).", show_default=False)] = None,
    tta: Annotated[str, typer.Option(
        help="Test-time augmentation at each evaluation: none, flip (the image and its mirror "
             "averaged) or flip-translate (also shifted a pixel; as the speed records).")
    ] = "none",
    ema: Annotated[Optional[float], typer.Option(
        help="Weight averaging: keep an exponential moving average of the weights (and the "
             "BatchNorm statistics) with this decay per iteration, in (0, 1); evaluations use "
             "it and it is the model logged.", show_default=False)] = None,
    label_smoothing: Annotated[float, typer.Option(
        help="Label smoothing of the cross-entropy, in [0, 1]: the true class's target is "
             "1 - s + s/classes, every other class's s/classes.")] = 0.0,
    l1: Annotated[float, typer.Option(
        help="L1 penalty: the loss adds L1 times the sum of |w| over the weights of the "
             "convolutions and linear layers (not biases, not normalization layers).")] = 0.0,
    clip_grad: Annotated[Optional[float], typer.Option(
        help="Clip the gradient's total L2 norm (all parameters) to this before each step "
             "(default: no clipping).", show_default=False)] = None,
    val_split: Annotated[Optional[float], typer.Option(
        help="Hold out this many training images (or this fraction, < 1), the same share of "
             "each class, chosen by the seed; val/acc and val/loss at each evaluation.",
        show_default=False)] = None,
    early_stop: Annotated[Optional[int], typer.Option(
        help="Stop when --monitor has not improved for this many evaluations in a row.",
        metavar="PATIENCE", show_default=False)] = None,
    monitor: Annotated[str, typer.Option(
        help=f"The metric that selects the best evaluation and stops early: "
             f"{', '.join(MONITORS)} (losses minimize; test/ ones leak the test set into "
             "model selection: a warning).")] = "val/acc",
    keep: Annotated[Optional[str], typer.Option(
        help=f"The weights logged as the model: {' or '.join(KEEPS)} (best: the evaluation "
             "with the best --monitor; default: best with --early-stop, else last).",
        show_default=False)] = None,
    analyze: Annotated[str, typer.Option(
        help="Comma list of analyses run on the trained model, logged into the training run: "
             "grad-cam, embedding, calibration, ... (`cifarx plugins`; see `cifarx "
             "analyze`).")] = "",
    analysis_opt: AnalysisOpt = None,
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: Threads = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    description: Description = None,
    tag: Tag = None,
    system_metrics: SystemMetrics = True,
    register_model: Annotated[Optional[str], typer.Option(
        help="Add the trained model to the MLflow Model Registry under this name (a new "
             "version), loadable as models:/NAME/<version>.", show_default=False)] = None,
    checkpoint_every: Annotated[int, typer.Option(
        help="Save the training state as the run's checkpoint every N iterations (and at "
             "SIGTERM), so that --resume can continue it; 0: none.")] = 0,
    resume: Annotated[Optional[str], typer.Option(
        help="Continue this run (killed, or ended by SIGTERM) from its last checkpoint, with "
             "every option it was started with.", show_default=False, metavar="RUN_ID")] = None,
    ctx: typer.Context = None,
):
    """Train an architecture and log the run, its curves and the model to MLflow."""
    from .. import runs
    from .console import TrainingProgress, duration, err, out

    if resume:  # the run says how to train: a training option here would contradict it
        given = [p.opts[0] for p in ctx.command.params if p.name not in RESUME_WITH and
                 getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") != "DEFAULT"]
        if given:
            raise UserError(f"--resume takes every option from the run; drop {', '.join(given)}"
                            " (accepted with it: --tracking-uri, --no-system-metrics)")
        tracking = _tracking(tracking_uri, experiment, run_name, None, None, system_metrics)
        job, state, tracking = runs.prepare_resume(resume, tracking, plugins_catalog())
        cfg = job.plan.config
        with TrainingProgress(cfg.iters, cfg.batch_size, job.label) as progress:
            done = runs.train_run(job, tracking, [progress.update], resume=state)
        out.print(f"[bold]{job.label}[/]: resumed at iteration {state[1]['step']}; final test "
                  f"accuracy [bold green]{done.result.test_acc:.2%}[/]; run {done.run_id}",
                  soft_wrap=True)
        _open_hint(tracking_uri, done.experiment_id, done.run_id)
        return

    config = TrainConfig(
        arch=arch, aug=parse_list(aug), dataset=dataset, train_split=train_split,
        data_dir=str(data_dir) if data_dir else None, iters=iters, batch_size=batch_size,
        eval_every=eval_every, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, seed=seed, device=device,
        precision=precision, threads=threads, probes=parse_list(probe),
        arch_options=with_pretrained(arch_opt or [], pretrained),
        aug_options=tuple(aug_opt or ()), probe_options=tuple(probe_opt or ()),
        dataset_options=tuple(dataset_opt or ()), adv_train=adv_train, adv_ratio=adv_ratio,
        attack_options=tuple(attack_opt or ()), adv_data=parse_list(",".join(adv_data or [])),
        label_smoothing=label_smoothing, l1=l1, clip_grad=clip_grad, val_split=val_split,
        early_stop=early_stop, monitor=monitor, keep=keep, checkpoint_every=checkpoint_every,
        init_from=init_from, freeze=parse_list(freeze or ""), lr_backbone=lr_backbone, tta=tta,
        ema=ema, classes=parse_list(classes or ""))
    # Every check, the data and the model first: bad input opens no run.
    found = plugins_catalog()
    analyses = None
    if analyze or analysis_opt:
        from ..inference.analysis import plan as plan_analyses

        analyses = plan_analyses(found, parse_list(analyze), analysis_opt or (), seed=seed,
                                 flag="--analyze")
    tracking = _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics,
                         register_model)
    with err.status(f"loading {dataset} and building {arch} ..."):  # seconds, not silence
        job = runs.prepare_training(config, found, tracking_uri)
    for warning in job.warnings():
        err.print(f"cifarx: warning: {warning}", highlight=False, soft_wrap=True)
    cfg = job.plan.config
    with TrainingProgress(cfg.iters, cfg.batch_size, job.label) as progress:
        done = runs.train_run(job, tracking, [progress.update], analyses=analyses)
    result = done.result
    out.print(f"[bold]{job.label}[/]: final test accuracy [bold green]{result.test_acc:.2%}[/] "
              f"(loss {result.test_loss:.3f}) after {result.steps} iterations in "
              f"{duration(result.seconds)}, {result.images_per_second:,.0f} img/s on "
              f"{job.plan.device} ({cfg.precision})", soft_wrap=True)
    if result.best is not None:
        stopped = f"{result.stopped.reason}; " if result.stopped is not None else ""
        out.print(f"{stopped}best {cfg.monitor} {result.best[1]:.4g} at iteration "
                  f"{result.best[0]}; the model has the {cfg.keep} weights", highlight=False,
                  soft_wrap=True)
    for name, findings in done.findings.items():
        _print_findings(name, findings)
    out.print(f"run {done.run_id}  model {done.model_uri}", highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)
    if done.registered:
        from ..tracking.common import tracking_uri as resolve_uri
        from .console import registry_hint

        out.print(registry_hint(resolve_uri(tracking_uri), *done.registered), highlight=False,
                  soft_wrap=True)


RESUME_WITH = {"resume", "tracking_uri", "system_metrics", "ctx"}  # flags --resume accepts


def with_pretrained(arch_opt: list[str], pretrained: bool) -> tuple[str, ...]:
    """``--pretrained`` is ``--arch-opt pretrained=true``, unless a weights file is named there."""
    named = any(text.partition("=")[0].strip() == "pretrained" for text in arch_opt)
    return tuple(arch_opt) + (("pretrained=true",) if pretrained and not named else ())
