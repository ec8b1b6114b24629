"""The ``cifarx`` command: parse the options, call :mod:`cifarx.runs`, print.

Imports here stay light (no torch, mlflow or matplotlib at module level): ``cifarx --help``
and ``cifarx <command> --help`` answer in a fraction of a second. Each command imports what
it runs.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .config import ADV_RATIO, KEEPS, MONITORS, TrainConfig, parse_list
from .errors import Diverged, Terminated, UserError, raise_on_sigterm
from .optim import DEFAULTS, OPTIMIZERS, SCHEDULES
from .tracking import DEFAULT_EXPERIMENT

app = typer.Typer(
    name="cifarx", no_args_is_help=True, add_completion=False,
    help="Train, probe and attack small-image CNNs; every run is tracked in MLflow.")


def command(fn):
    """Register a command whose UserError becomes one line and exit status 2 (a diverged
    training: one line and status 3)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import signal

        previous = raise_on_sigterm()  # SIGTERM ends the runs KILLED, as Ctrl-C does
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Diverged as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(Diverged.exit_status) from None
        except Terminated:
            typer.echo("cifarx: terminated (SIGTERM)", err=True)
            raise typer.Exit(Terminated.exit_status) from None
        except KeyboardInterrupt:
            typer.echo("cifarx: interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            run = getattr(exc, "cifarx_run", None)
            typer.echo(f"cifarx: error: the disk is full (writing {exc.filename or 'a file'}): "
                       "free some space and run again"
                       + (f"; run {run} ended FAILED with what it had logged" if run else ""),
                       err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # a plugin's own failure: name it; a bug of cifarx: traceback
            from .registry import catalog

            culprit = catalog().blame(exc.__traceback__)
            if culprit is None or culprit.builtin or os.environ.get("CIFARX_TRACEBACK"):
                raise
            run = getattr(exc, "cifarx_run", None)
            where = (f"the traceback is in run {run}, error.txt" if run else
                     "CIFARX_TRACEBACK=1 shows the traceback")
            typer.echo(f"cifarx: error: the {culprit.kind} plugin {culprit.name!r} of "
                       f"{culprit.package} {culprit.version} failed: "
                       f"{' '.join(f'{type(exc).__name__}: {exc}'.split())} ({where})",
                       err=True)
            raise typer.Exit(1) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return app.command()(run)


def plugins_catalog():
    from .registry import catalog

    found = catalog()
    for problem in found.problems:
        typer.echo(f"cifarx: warning: {problem}", err=True)
    return found


def _version(value: bool):
    if value:
        typer.echo(f"cifarx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    pass


def _threads(threads: int | None):
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def check_tag_key(key: str, text: str) -> str:
    """MLflow's own rule for tag keys, applied before any run opens (a refused key failed the
    run after it had started)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_tag_name

    try:
        _validate_tag_name(key)
    except MlflowException as exc:
        why = str(exc.message).partition("supplied: ")[2].split(". ")[0] or "refused"
        raise UserError(f"--tag {text}: MLflow refuses the key {key!r}: {why}") from None
    return key


def _tracking(tracking_uri, experiment, run_name, description=None, tag=None,
              system_metrics=True, register_model=None):
    """Where the command's run goes; every command that opens a run calls this first, so a
    tracking server that does not answer is one line before any work (cifarx.spool)."""
    from .runs import Tracking
    from .spool import require_server

    tags = {}
    for text in tag or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tag {text}: accepted: KEY=VALUE")
        tags[check_tag_key(key.strip(), text)] = value.strip()
    tracking = Tracking(tracking_uri, experiment, run_name, tags=tags, description=description,
                        system_metrics=system_metrics, register_model=register_model)
    require_server(tracking.resolved_uri)
    return tracking


def _open_hint(uri: str | None, experiment_id: str, run_id: str):
    from .console import out, ui_hint
    from .tracking import tracking_uri

    out.print(ui_hint(tracking_uri(uri), experiment_id, run_id), highlight=False, soft_wrap=True)


# Options shared by the commands that run something.
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
Precision = Annotated[str, typer.Option(
    help="Forward passes in fp32, or bf16 (autocast; weights, loss and gradients stay fp32); "
         "auto: bf16 where the device computes it natively (recent GPUs, AVX-512 CPUs).")]
Seed = Annotated[int, typer.Option(help="Seed for weights, batches, augmentation and attacks.")]
DataDir = Annotated[Optional[Path], typer.Option(
    help="Folder holding the dataset files (default: $CIFARX_DATA_DIR or ~/.cache/cifarx).",
    show_default=False)]
Experiment = Annotated[str, typer.Option(help="MLflow experiment name.")]
RunName = Annotated[Optional[str], typer.Option(help="MLflow run name (default: from the options).",
                                                show_default=False)]
TrackingUri = Annotated[Optional[str], typer.Option(
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).",
    show_default=False)]
DatasetName = Annotated[str, typer.Option("--dataset", help="Dataset plugin.")]
ModelDataset = Annotated[Optional[str], typer.Option(
    "--dataset", help="Dataset plugin (default: the one the model was trained on).",
    show_default=False)]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Load a model that is only a pickle (another tool's, or an older "
    "cifarx's): unpickling runs whatever code its author put in it. Also CIFARX_TRUST_PICKLE=1.")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's choice).",
                                                show_default=False)]
Description = Annotated[Optional[str], typer.Option(
    help="The run's description in the MLflow UI (default: what the command did).",
    show_default=False)]
Tag = Annotated[Optional[list[str]], typer.Option(
    help="A tag on the run: KEY=VALUE; repeatable.", show_default=False)]
SystemMetrics = Annotated[bool, typer.Option(
    "--system-metrics/--no-system-metrics",
    help="Sample CPU, memory and GPU use into the run's system/* metrics (MLflow's monitor; "
         "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL sets the period, 10 s).")]


def opt_flag(kind: str, shape: str) -> object:
    """A repeatable option flag (``--arch-opt NAME=VALUE``): one help text for every kind."""
    return Annotated[Optional[list[str]], typer.Option(
        help=f"{kind.capitalize()} option {shape}, repeatable (`cifarx describe {kind} NAME` "
             "lists a plugin's options).", show_default=False)]


ArchOpt = opt_flag("architecture", "NAME=VALUE")
AugOpt = opt_flag("augmentation", "PLUGIN.NAME=VALUE")
ProbeOpt = opt_flag("probe", "PLUGIN.NAME=VALUE")
AttackOpt = opt_flag("attack", "NAME=VALUE")
DatasetOpt = opt_flag("dataset", "NAME=VALUE")
ExecutorOpt = opt_flag("executor", "NAME=VALUE")
AnalysisOpt = opt_flag("analysis", "PLUGIN.NAME=VALUE")
PER_ARCH = "(default: the architecture's, else {})"
MODEL_HELP = "runs:/<run id>/model, models:/<name>/<version>, or a local MLflow model folder."


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
    from . import runs
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
        early_stop=early_stop, monitor=monitor, keep=keep, checkpoint_every=checkpoint_every)
    # Every check, the data and the model first: bad input opens no run.
    found = plugins_catalog()
    analyses = None
    if analyze or analysis_opt:
        from .analysis import plan as plan_analyses

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
        from .console import registry_hint
        from .tracking import tracking_uri as resolve_uri

        out.print(registry_hint(resolve_uri(tracking_uri), *done.registered), highlight=False,
                  soft_wrap=True)


RESUME_WITH = {"resume", "tracking_uri", "system_metrics", "ctx"}  # flags --resume accepts


def with_pretrained(arch_opt: list[str], pretrained: bool) -> tuple[str, ...]:
    """``--pretrained`` is ``--arch-opt pretrained=true``, unless a weights file is named there."""
    named = any(text.partition("=")[0].strip() == "pretrained" for text in arch_opt)
    return tuple(arch_opt) + (("pretrained=true",) if pretrained and not named else ())


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
    from . import runs
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


def _print_findings(name: str, findings, seconds: float | None = None):
    from .console import duration, out

    took = f" ({duration(seconds)})" if seconds is not None else ""
    said = [findings.summary] if findings.summary else []
    files = [f"figures/{name}.png"] * (findings.figure is not None) + list(findings.files)
    out.print(f"[bold]{name}[/]{took}: " + "  ".join(said + files), highlight=False,
              soft_wrap=True)


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
    from . import runs
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


@command
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List the installed plugins: name, kind, package, version, summary."""
    from rich.markup import escape
    from rich.table import Table

    from .console import out

    found = plugins_catalog()
    clashes = set(found.clashes())
    rows = [dict(name=e.name, kind=e.kind, package=e.package, version=e.version,
                 summary=e.summary, clash=(e.kind, e.name) in clashes)
            for e in sorted(found.entries, key=lambda e: (e.kind, e.name, e.package))]
    if as_json:
        typer.echo(json.dumps({"plugins": rows, "problems": found.problems}, indent=2))
        return
    table = Table("name", "kind", "package", "version", "summary", title="cifarx plugins")
    for row in rows:
        name = f"[red]{row['name']} (clash)[/]" if row["clash"] else row["name"]
        table.add_row(name, row["kind"], row["package"], row["version"], row["summary"])
    out.print(table)
    if clashes:
        out.print("[red]names in red are registered by more than one package; using them is "
                  "an error:[/]")
        for kind, name in sorted(clashes):
            out.print(f"[red]  {escape(found.clash_advice(kind, name))}[/]", highlight=False,
                      soft_wrap=True)


@command
def describe(
    first: Annotated[str, typer.Argument(
        metavar="[KIND] NAME", help="A plugin: KIND NAME (architecture, augmentation, dataset, "
        "probe, attack, executor, analysis), or an architecture's NAME alone.")],
    name: Annotated[Optional[str], typer.Argument(hidden=True)] = None,
    dataset: Annotated[str, typer.Option(
        help="Architectures: the dataset whose image shape and classes to build for.")] = "cifar10",
    image_size: Annotated[Optional[int], typer.Option(
        help="Architectures: input height and width (default: the dataset's).",
        show_default=False)] = None,
    channels: Annotated[Optional[int], typer.Option(
        help="Architectures: input channels (default: the dataset's).", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option(
        help="Architectures: output classes (default: the dataset's).", show_default=False)] = None,
    arch_opt: ArchOpt = None,
):
    """A plugin's summary and options; for an architecture, its layers, output shapes and
    parameters too."""
    from rich.table import Table

    from .config import resolve_plugin_options
    from .console import out
    from .options import describe as option_rows
    from .plugin_types import KINDS

    kind, plugin_name = ("architecture", first) if name is None else (first, name)
    if kind not in KINDS:
        raise UserError(f"unknown plugin kind {kind!r}; accepted: {', '.join(KINDS)}")
    found = plugins_catalog()
    plugin = found.get(kind, plugin_name)
    if kind == "architecture":
        describe_architecture(found, plugin, dataset, image_size, channels, num_classes,
                              resolve_plugin_options(kind, plugin, arch_opt or []))
    else:
        stage = f" (stage {plugin.stage})" if kind == "augmentation" else ""
        out.print(f"[bold]{kind} {plugin.name}[/]{stage}: {plugin.summary}", soft_wrap=True)
    if plugin.options:
        from .config import OPTION_FLAGS

        flag = OPTION_FLAGS[kind][0]
        shape = "NAME=VALUE" if kind in ("architecture", "attack", "dataset", "executor") else \
            f"{plugin.name}.NAME=VALUE"
        table = Table("option", "default", "accepted", "help", title=f"{flag} {shape}")
        for row in option_rows(plugin.options):
            table.add_row(*row)
        out.print(table)
    else:
        out.print(f"{plugin.name} takes no options")


def describe_architecture(found, arch, dataset, image_size, channels, num_classes, values):
    from rich.table import Table

    from .console import out
    from .loop import plugin_call
    from .model import describe as layer_rows

    data = found.get("dataset", dataset)
    channels = channels or data.image_shape[0]
    size = image_size or data.image_shape[1]
    classes = num_classes or data.num_classes
    net = plugin_call("architecture", None, values, functools.partial(
        arch.build, num_classes=classes, in_channels=channels, image_size=size))
    table = Table("layer", "type", "output shape", "params",
                  title=f"{arch.name}: {arch.summary}", caption=f"input {channels}x{size}x{size}; "
                  f"total parameters {sum(p.numel() for p in net.parameters()):,}")
    for row in layer_rows(net, (channels, size, size)):
        table.add_row(row.name, row.kind, " x ".join(map(str, row.output_shape)), f"{row.params:,}")
    out.print(table)


@command
def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(
        help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 serves the network, "
             "with no authentication.")] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        help="Where the artifacts of runs logged through a tracking server (mlflow-artifacts:/) "
             "are: the folder (or URI) that server stored them in, its --artifacts-destination "
             "(default: its ./mlartifacts; found beside the database when it is there).",
        show_default=False)] = None,
):
    """Start the MLflow UI on the store (a tracking server already has its own: it says where)."""
    import errno
    import ipaddress
    import socket

    from .console import MODEL_TRAINING, err, out
    from .tracking import tracking_uri as resolve_uri

    uri = resolve_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        out.print(f"{uri} is an MLflow server: its UI is already there, open "
                  f"{uri.rstrip('/')}/#/?{MODEL_TRAINING}",
                  highlight=False, soft_wrap=True)
        return
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: accepted: 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # the server would print a traceback and exit 0 on a busy port
            probe.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise UserError(f"--host {host} --port {port}: {reason}; choose another port "
                            f"(--port {port + 1}) or stop what serves there") from None
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        err.print(f"cifarx: warning: the MLflow UI has no authentication: anyone who reaches "
                  f"{host}:{port} can read, change and delete every run", highlight=False,
                  soft_wrap=True)
    served = _served_artifacts(uri, artifacts_destination)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    err.print(f"MLflow UI for {uri} at http://{shown}:{port}/#/?{MODEL_TRAINING} (Ctrl-C "
              "stops it)", highlight=False, soft_wrap=True)
    # The server's background job runners serve MLflow's GenAI features, not these runs: off
    # unless asked for, as they cost eight processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": uri}
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port),
                               "--artifacts-destination", served], env)


def _served_artifacts(uri: str, given: str | None) -> str:
    """The folder the UI serves ``mlflow-artifacts:/`` URIs from: those of the runs logged
    through a tracking server into this store. MLflow's default is ./mlartifacts wherever the
    UI starts, where they are not: it then shows "No Artifacts Recorded". ``given``; else the
    server's default folder beside an SQLite database, when it is there; else ./mlartifacts,
    with a warning when the store has such runs."""
    from .console import err

    if given:
        return given if "://" in given else str(Path(given).expanduser().absolute())
    sqlite = "sqlite:///"
    beside = Path(uri[len(sqlite):]).parent / "mlartifacts" if uri.startswith(sqlite) else None
    count = _server_logged_runs(uri)
    if count and beside is not None and beside.is_dir():
        err.print(f"artifacts of the {count} run(s) logged through a tracking server: {beside} "
                  "(--artifacts-destination to say otherwise)", highlight=False, soft_wrap=True)
        return str(beside)
    if count:
        err.print(f"cifarx: warning: {count} run(s) in this store keep their artifacts where the "
                  "tracking server they were logged through stored them (mlflow-artifacts:/...): "
                  "pass that server's --artifacts-destination (default: ./mlartifacts in the "
                  "folder it was started in) as --artifacts-destination, or the UI shows them "
                  "without artifacts", highlight=False, soft_wrap=True)
    return str(Path("mlartifacts").absolute())


def _server_logged_runs(uri: str) -> int:
    """How many runs of the store have their artifacts on a tracking server; 0 when the store
    cannot say (not a database yet, another schema)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect() as db:
                return db.execute(sqlalchemy.text(
                    "SELECT COUNT(*) FROM runs WHERE artifact_uri LIKE 'mlflow-artifacts:%'"
                )).scalar() or 0
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001  a store to serve, not to check
        return 0


# `cifarx attack`'s own flags for the built-in attacks' common options; each is the same as
# --attack-opt NAME=VALUE, and an attack that lacks the option says so.
ATTACK_FLAGS = {"eps": "--eps", "confidence": "--confidence", "alpha": "--alpha",
                "steps": "--steps", "max_steps": "--max-steps", "target": "--target"}


@command
def attack(
    model: Annotated[str, typer.Option(help="The model to attack: " + MODEL_HELP)],
    attack_name: Annotated[str, typer.Option(
        "--attack", help="Attack plugin: ifgsm, fgsm, pgd, fool-noise, ... (`cifarx plugins`).")
    ] = "ifgsm",
    eps: Annotated[Optional[str], typer.Option(
        help="Step size (ifgsm, fool-noise) or L-inf radius (fgsm, pgd), in (0, 1]: 1/255 or "
             "0.0039 (default: the attack's).", show_default=False)] = None,
    confidence: Annotated[Optional[str], typer.Option(
        help="Stop when a wrong class (or the target) has this probability (ifgsm, "
             "fool-noise).", show_default=False)] = None,
    max_steps: Annotated[Optional[str], typer.Option(
        help="Steps after which an image counts as failed (ifgsm, fool-noise).",
        show_default=False)] = None,
    alpha: Annotated[Optional[str], typer.Option(
        help="Step size (pgd).", show_default=False)] = None,
    steps: Annotated[Optional[str], typer.Option(
        help="Number of steps (pgd).", show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option(
        help="Targeted: a class index or name, or next (the class after the true one) "
             "(default: untargeted).", show_default=False)] = None,
    attack_opt: AttackOpt = None,
    per_class: Annotated[Optional[int], typer.Option(
        help="Attack this many correctly classified test images of each class (default: 2 "
             "unless --count or --all-test).", show_default=False)] = None,
    count: Annotated[Optional[int], typer.Option(
        help="Attack this many correctly classified test images, any class.",
        show_default=False)] = None,
    all_test: Annotated[bool, typer.Option(
        "--all-test", help="Attack every correctly classified test image.")] = False,
    replace: Annotated[bool, typer.Option(
        "--replace/--no-replace", help="With --per-class: attack the next image of its class in "
        "place of one that fails (up to 10 times), so that each class gets its successes; "
        "replacements are counted in attack/replaced.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images attacked at once.")] = 500,
    dataset: ModelDataset = None,
    dataset_opt: DatasetOpt = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    seed: Seed = 0,
    threads: Threads = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    description: Description = None,
    tag: Tag = None,
    system_metrics: SystemMetrics = True,
    trust_pickle: TrustPickle = False,
):
    """Adversarial images for test images a model gets right; a run linked to the model's run."""
    from . import runs
    from .adversarial import SET_ARTIFACT, TABLE_IMAGES
    from .console import duration, err, image_table, out

    given = {"eps": eps, "confidence": confidence, "max_steps": max_steps, "alpha": alpha,
             "steps": steps, "target": target}
    texts = tuple(f"{name}={value}" for name, value in given.items() if value is not None)
    _threads(threads)
    config = runs.AttackConfig(
        model=model, attack=attack_name, attack_options=texts + tuple(attack_opt or ()),
        option_flags={n: ATTACK_FLAGS[n] for n, v in given.items() if v is not None},
        per_class=per_class, count=count, all_test=all_test, replace=replace,
        batch_size=batch_size,
        dataset=dataset, data_dir=str(data_dir) if data_dir else None,
        dataset_options=tuple(dataset_opt or ()), device=device, seed=seed,
        trust_pickle=trust_pickle)

    def started(n: int, on):
        err.print(f"{attack_name}: attacking {n:,} images on {on}", highlight=False)

    tracking = _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics)
    done = runs.attack_run(config, tracking, plugins_catalog(), started)
    m, adv_set = done.metrics, done.adv_set
    if len(adv_set["labels"]) <= TABLE_IMAGES:
        out.print(image_table(adv_set))
    out.print(f"[bold]{adv_set['attack']}[/]: goal reached on [bold green]"
              f"{m['attack/success_rate']:.1%}[/] of {int(m['attack/images']):,} images "
              f"({int(m['attack/failures'])} failed), misclassified "
              f"{m['attack/misclassified_rate']:.1%}, mean {m['attack/mean_steps']:.1f} steps, "
              f"L-inf mean {m['attack/linf_mean'] * 255:.2f}/255 max "
              f"{m['attack/linf_max'] * 255:.2f}/255, L2 mean {m['attack/l2_mean']:.3f} max "
              f"{m['attack/l2_max']:.3f}, in {duration(m['attack/seconds'])}", soft_wrap=True)
    if m["attack/replaced"]:
        out.print(f"replaced {int(m['attack/replaced'])} image(s) that failed by the next "
                  "correctly classified image of their class (--no-replace keeps them)",
                  highlight=False, soft_wrap=True)
    out.print(f"run {done.run_id}  set {SET_ARTIFACT}  figure figures/adversarial.png",
              highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)


@command
def transfer(
    adversarial_runs: Annotated[list[str], typer.Option(
        "--adversarial", help="Run id of a `cifarx attack` run (or a set.pt file); repeatable.")],
    model: Annotated[list[str], typer.Option(help="A target model: " + MODEL_HELP
                                             + " Repeatable.")],
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
    """Feed stored adversarial images to other models: accuracy and transfer rate, as a run."""
    from . import runs
    from .console import out, transfer_table

    _threads(threads)
    tracking = _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics)
    done = runs.transfer_run(runs.TransferConfig(tuple(adversarial_runs), tuple(model), device,
                                                 trust_pickle), tracking)
    out.print(transfer_table(done.sources, done.targets, done.cells))
    out.print(f"run {done.run_id}  transfer.json"
              + ("  figures/transfer_matrix.png" if len(done.cells) > 1 else ""),
              highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)


@command
def sweep(
    study_file: Annotated[Optional[Path], typer.Argument(
        metavar="[STUDY.toml]", help="A study file (see the documentation's Studies page); "
        "without one, --set and --grid say what to run.", show_default=False)] = None,
    grid: Annotated[Optional[list[str]], typer.Option(
        help="An axis: KEY=V1,V2,... (an option of `cifarx train`, as in a study file: lr, "
             "aug, arch-opt.activation, ...); repeatable. For aug, probe and adv-data each "
             "--grid KEY=VALUE adds one value.", show_default=False)] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="A fixed option: KEY=VALUE, as in the study's \\[train] table; repeatable.",
        show_default=False)] = None,
    seeds: Annotated[Optional[int], typer.Option(
        help="Seeds 0..N-1 for every configuration (default: the study's, else 1).",
        show_default=False)] = None,
    search: Annotated[Optional[str], typer.Option(
        help="grid (every combination), random (--trials draws from the study's \\[random] table) or tpe "
             "(Optuna's TPE picks --trials configurations from \\[random] and \\[grid], "
             "learning from the results; poor trials are pruned).",
        show_default=False)] = None,
    trials: Annotated[Optional[int], typer.Option(
        help="Random and tpe search: configurations tried.", show_default=False)] = None,
    metric: Annotated[Optional[str], typer.Option(
        help="The metric that ranks configurations (default: final/test_acc).",
        show_default=False)] = None,
    direction: Annotated[Optional[str], typer.Option(
        help="maximize or minimize the metric.", show_default=False)] = None,
    executor: Annotated[Optional[str], typer.Option(
        help="Executor plugin: local (processes here), ray, ... (default: the study's, else "
             "local).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="local: trials at once; same as --executor-opt workers=N.",
        show_default=False)] = None,
    executor_opt: ExecutorOpt = None,
    resume: Annotated[Optional[str], typer.Option(
        help="The run id of a sweep to complete: runs only its missing, FAILED or KILLED "
             "trials.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the trials and exit, opening no run.")] = False,
    experiment: Annotated[Optional[str], typer.Option(
        help="MLflow experiment (default: the study's).", show_default=False)] = None,
    tracking_uri: TrackingUri = None,
    description: Description = None,
    tag: Tag = None,
    register_model: Annotated[Optional[str], typer.Option(
        help="Add the best trial's model (the best configuration's best seed) to the MLflow "
             "Model Registry under this name.", show_default=False)] = None,
):
    """Run a study: every configuration with several seeds, in parallel, as child runs of one
    sweep run, with statistics over the seeds."""
    from . import studies
    from .console import err, out, print_whole, sweep_table
    from .sweep import load_resumed, plan_sweep, sweep_run, trial_name
    from .tracking import tracking_uri as resolve_uri

    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    tags = _tracking(tracking_uri, experiment, None, description, tag).tags
    if resume:
        if study_file or grid or set_:
            raise UserError("--resume takes the study from the sweep's run; give no study "
                            "file, --grid or --set with it")
        study = load_resumed(resume, resolve_uri(tracking_uri))
    else:
        raw = {}
        if study_file is not None:
            study = studies.load(study_file)
            raw = studies.raw_of(study)
        raw = studies.with_flags(raw, grid or [], set_ or [])
        study = studies.from_dict(raw, str(study_file or "the command line"),
                                  study.source if study_file else "")
    study = studies.overrides(study, seeds=seeds, search=search, trials=trials, metric=metric,
                              direction=direction, experiment=experiment)
    name = executor or study.executor.get("name", "local")
    # The study's [executor] options, then the flags: a flag wins over the file (as documented);
    # the file's options belong to its executor, so another --executor starts without them.
    chosen = {k: str(v).lower() if isinstance(v, bool) else str(v)
              for k, v in study.executor.items()
              if k != "name" and name == study.executor.get("name", "local")}
    flags = {}
    for text in executor_opt or ():
        key, sep, value = text.partition("=")
        if sep and key.strip():
            chosen.pop(key.strip(), None)
    texts = [f"{k}={v}" for k, v in chosen.items()] + list(executor_opt or ())
    if workers is not None:
        texts = [t for t in texts if not t.startswith("workers=")] + [f"workers={workers}"]
        flags["workers"] = "--workers"
    sweep = plan_sweep(study, name, texts, flags, tracking_uri, plugins_catalog())
    if dry_run:
        for trial in sweep.trials:
            out.print(f"{trial.number:>4}  {trial_name(trial.axes, trial.config.seed)}",
                      highlight=False)
        out.print(f"{len(sweep.trials)} trials ({len(sweep.configurations)} configurations x "
                  f"{len(study.seeds)} seeds) on {name}; no run opened", highlight=False)
        return

    def heard(outcome, done, total):
        trial = outcome.trial
        what = f"{outcome.metrics.get('final/test_acc', float('nan')):.2%}" \
            if outcome.status == "FINISHED" else f"[red]{outcome.status}[/]: {outcome.error}"
        err.print(f"[{done}/{total}] {trial_name(trial.axes, trial.config.seed)}: {what}",
                  soft_wrap=True, highlight=False)

    def opened(run_id, to_run, earlier):  # a sweep runs for hours: say at once what it does
        again = f" ({earlier} finished earlier)" if earlier else ""
        err.print(f"sweep run {run_id}: {to_run} trials to run on {name}{again}",
                  highlight=False, soft_wrap=True)

    done = sweep_run(sweep, resume, heard, register_model, description, tags, opened)
    if done.reused:
        out.print(f"{done.reused} trial(s) finished earlier were not run again", highlight=False)
    if done.ranked:
        print_whole(sweep_table(done.ranked, studies.axes_of(study), study.metric))
    out.print(done.verdict, highlight=False, soft_wrap=True)
    for outcome in done.failed:
        out.print(f"[red]trial {outcome.trial.number} "
                  f"({trial_name(outcome.trial.axes, outcome.trial.config.seed)}) "
                  f"{outcome.status}[/]: {outcome.error}", highlight=False, soft_wrap=True)
    if register_model and done.best_run:
        out.print(f"best trial's model (run {done.best_run}) registered as {register_model}",
                  highlight=False, soft_wrap=True)
    out.print(f"sweep run {done.run_id}  sweep.json  sweep.csv  figures/sweep_axes.png",
              highlight=False, soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)
    if done.failed and not done.summary:  # nothing to compare: the sweep itself failed
        typer.echo(f"cifarx: error: every trial failed ({len(done.failed)} of "
                   f"{len(done.failed)}; said above); fix the cause, then `cifarx sweep "
                   f"--resume {done.run_id}` runs them again", err=True)
        raise typer.Exit(1)


@command
def sync(
    spooled_run: Annotated[Optional[str], typer.Argument(
        metavar="[RUN_ID|FOLDER]", help="A spooled run: its run id, or its spool folder "
        "(default: every run spooled and not uploaded yet).", show_default=False)] = None,
):
    """Upload the runs that went on into a local spool when their tracking server was lost
    (each into the same run on the server it names; $CIFARX_SPOOL_DIR holds the spools)."""
    from .console import out, ui_hint
    from .spool import find, spool_root, spooled, sync as upload

    spools = [find(spooled_run)] if spooled_run else spooled()
    if not spools:
        out.print(f"nothing to sync: no spooled run waits in {spool_root()}", highlight=False,
                  soft_wrap=True)
        return

    def heard(done):
        what = f"run {done.run_id} ({done.run_name})"
        if done.problem:
            out.print(f"{what}: [red]not synced[/]: {done.problem}", highlight=False,
                      soft_wrap=True)
        elif done.earlier:
            out.print(f"{what}: synced earlier ({done.earlier}); nothing to send",
                      highlight=False, soft_wrap=True)
        else:
            out.print(f"{what}: {done.records} record(s) uploaded to {done.uri}; "
                      f"{ui_hint(done.uri, done.experiment_id, done.run_id)}", highlight=False,
                      soft_wrap=True)

    left = [done for done in upload(spools, heard) if done.problem]
    if left:
        raise UserError(f"{len(left)} of {len(spools)} spooled run(s) not synced (said above); "
                        "their spools are kept: run `cifarx sync` again")


from . import cli_report  # noqa: E402,F401  (registers `cifarx report`)


def main():
    app(prog_name="cifarx")
