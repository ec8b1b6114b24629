"""The ``cifarx`` command: parse options, look up plugins, call the engine, report."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__, engine, tracking
from .console import TrainingProgress, duration, err, out, ui_hint
from .errors import Diverged, UserError
from .registry import Catalog, catalog as load_catalog

app = typer.Typer(
    name="cifarx", no_args_is_help=True, add_completion=False,
    help="Train, probe and attack small-image CNNs; every run is tracked in MLflow.")


def command(fn):
    """Register a command whose UserError becomes one line and exit status 2 (a diverged
    training: one line and status 3)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Diverged as exc:
            typer.echo(f"cifarx: error: {exc}", err=True)
            raise typer.Exit(Diverged.exit_status) from None
        except KeyboardInterrupt:
            typer.echo("cifarx: interrupted", err=True)
            raise typer.Exit(130) from None

    return app.command()(run)


def plugins_catalog() -> Catalog:
    found = load_catalog()
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
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's choice).",
                                                show_default=False)]

PER_ARCH = "(default: the architecture's, else {})"
ArchOpt = Annotated[Optional[list[str]], typer.Option(
    help="Architecture option name=value, repeatable: activation=relu|relu6|leaky_relu|elu|silu, "
         "init=default|he|xavier for the built-in conv nets (`cifarx describe ARCH` lists an "
         "architecture's).", show_default=False)]


@command
def train(
    arch: Annotated[str, typer.Option(help="Architecture plugin (see `cifarx plugins`).")] = "table1",
    aug: Annotated[str, typer.Option(
        help="Comma list of augmentation plugins. flip and crop imply normalize unless raw "
             "is named; the plugins fix the order.")] = "flip,crop",
    dataset: DatasetName = "cifar10",
    train_split: Annotated[str, typer.Option(
        help="Training images: batch1 (train batch #1, 10,000) or all (50,000).")] = "batch1",
    data_dir: DataDir = None,
    iters: Annotated[int, typer.Option(help="Training iterations.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per iteration.")] = 100,
    eval_every: Annotated[int, typer.Option(
        help="Evaluate on the test set every N iterations (an 'epoch').")] = 100,
    optimizer: Annotated[Optional[str], typer.Option(
        help=f"{', '.join(engine.OPTIMIZERS)} " + PER_ARCH.format(engine.DEFAULTS['optimizer']),
        show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate " + PER_ARCH.format(engine.DEFAULTS['lr']),
        show_default=False)] = None,
    momentum: Annotated[Optional[float], typer.Option(
        help="Momentum (sgd, nesterov, rmsprop) " + PER_ARCH.format(engine.DEFAULTS['momentum']),
        show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="L2 weight decay " + PER_ARCH.format(engine.DEFAULTS['weight_decay']),
        show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(
        help=f"Learning-rate schedule: {', '.join(engine.SCHEDULES)} "
             + PER_ARCH.format(engine.DEFAULTS['schedule']), show_default=False)] = None,
    arch_opt: ArchOpt = None,
    pretrained: Annotated[bool, typer.Option(
        "--pretrained", help="Start from pretrained weights (timm:<model>; inputs resized to "
        "the weights' size); same as --arch-opt pretrained=true.")] = False,
    probe: Annotated[str, typer.Option(
        help="Comma list of probe plugins to record: grad-max, grad-norm, ...")] = "",
    probe_opt: Annotated[Optional[list[str]], typer.Option(
        help="Probe option probe.name=value, repeatable: grad-max.first=<layer>, "
             "grad-max.last=<layer>, grad-norm.stride=<iterations>.", show_default=False)] = None,
    adv_train: Annotated[Optional[str], typer.Option(
        help="Adversarial training: an attack plugin (fgsm, pgd, ...) that makes, at each "
             "iteration, adversarial versions of part of the batch from the current model; "
             "they replace those images, with their true labels.", show_default=False)] = None,
    adv_ratio: Annotated[Optional[float], typer.Option(
        help=f"With --adv-train: the fraction of each batch replaced, in (0, 1] (default "
             f"{engine.ADV_RATIO}).", show_default=False)] = None,
    attack_opt: Annotated[Optional[list[str]], typer.Option(
        help="With --adv-train: an option of the attack, name=value, repeatable: eps=8/255, "
             "steps=3, alpha=2/255, ... (default: the attack's; see `cifarx attack --help`).",
        show_default=False)] = None,
    adv_data: Annotated[Optional[list[str]], typer.Option(
        help="Run id of a `cifarx attack` run (or a set.pt file) whose adversarial images join "
             "the training data with their true labels; repeatable, or a comma list.",
        show_default=False)] = None,
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: Threads = None,
    experiment: Experiment = tracking.DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
):
    """Train an architecture and log the run, its curves and the model to MLflow."""
    config = engine.TrainConfig(
        arch=arch, aug=engine.parse_list(aug), dataset=dataset, train_split=train_split,
        data_dir=str(data_dir) if data_dir else None, iters=iters, batch_size=batch_size,
        eval_every=eval_every, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, seed=seed, device=device, precision=precision,
        threads=threads,
        probes=engine.parse_list(probe), arch_options=with_pretrained(arch_opt or [], pretrained),
        probe_options=tuple(probe_opt or ()), adv_train=adv_train, adv_ratio=adv_ratio,
        attack_options=tuple(attack_opt or ()),
        adv_data=engine.parse_list(",".join(adv_data or [])))
    plan = engine.plan(config, plugins_catalog())
    data = plan.load_data()
    uri = tracking.tracking_uri(tracking_uri)
    # A bad weights file, layer name, attack option or --adv-data run opens no run.
    prepared = engine.prepare(plan, data, uri)
    label = f"{plan.config.arch} ({','.join(plan.pipeline.names)})"
    if plan.attack is not None:
        label += f" adv {plan.attack.name} {plan.config.adv_ratio:g}"
    if prepared.adv_images is not None:
        label += f" +{len(prepared.adv_images):,} adv"
        err.print(f"cifarx: warning: --adv-data: its {len(prepared.adv_images):,} images are "
                  f"adversarial versions of {prepared.adv_test_images:,} test images; the test "
                  "accuracy counts their originals", highlight=False, soft_wrap=True)
    with tracking.start_run(uri, experiment, run_name or label, engine.run_tags(plan)) as run:
        with TrainingProgress(plan.config.iters, plan.config.batch_size, label) as progress:
            result = engine.train(plan, data, run, on_update=progress.update, prepared=prepared)
        experiment_id = run.experiment_id
    out.print(f"[bold]{label}[/]: final test accuracy [bold green]{result.test_acc:.2%}[/] "
              f"(loss {result.test_loss:.3f}) after {plan.config.iters} iterations in "
              f"{duration(result.seconds)}, {result.images_per_second:,.0f} img/s on {plan.device} "
              f"({plan.config.precision})",
              soft_wrap=True)
    out.print(f"run {run.id}  model {result.model_uri}", highlight=False, soft_wrap=True)
    out.print(ui_hint(uri, experiment_id, run.id), highlight=False, soft_wrap=True)


def with_pretrained(arch_opt: list[str], pretrained: bool) -> tuple[str, ...]:
    """``--pretrained`` is ``--arch-opt pretrained=true``, unless a weights file is named there."""
    named = any(text.partition("=")[0].strip() == "pretrained" for text in arch_opt)
    return tuple(arch_opt) + (("pretrained=true",) if pretrained and not named else ())


@command
def evaluate(
    model: Annotated[str, typer.Option(
        help="runs:/<run id>/model, models:/<name>/<version>, or a local MLflow model folder.")],
    dataset: DatasetName = "cifar10",
    data_dir: DataDir = None,
    device: Device = "auto",
    experiment: Experiment = tracking.DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
):
    """Test accuracy, per-class accuracy and a confusion matrix, logged as a run."""
    from .data import resolve_data_dir, resolve_device
    from .evaluation import evaluate_model

    found = plugins_catalog().get("dataset", dataset)
    target = resolve_device(device)
    uri = tracking.tracking_uri(tracking_uri)
    net = tracking.load_model(model, uri, target)
    data = found.load(resolve_data_dir(data_dir), found.splits[0])
    tags = {"cifarx.model_uri": model, "cifarx.dataset": found.name, "cifarx.device": str(target)}
    source = tracking.source_run_id(model)
    if source:
        tags["cifarx.source_run"] = source
    with tracking.start_run(uri, experiment, run_name or f"evaluate {model}", tags) as run:
        report = evaluate_model(net, data, target, run)
        experiment_id = run.experiment_id
    out.print(report.table())
    out.print(f"test accuracy [bold green]{report.accuracy:.2%}[/] (loss {report.loss:.3f}); "
              f"run {run.id}", highlight=False, soft_wrap=True)
    out.print(ui_hint(uri, experiment_id, run.id), highlight=False, soft_wrap=True)


@command
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """List the installed plugins: name, kind, package, version, summary."""
    from rich.table import Table

    found = plugins_catalog()
    clashes = {key for key in found.clashes()}
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
        out.print("[red]names in red are registered by more than one package; using them is an "
                  "error until one is uninstalled or CIFARX_LOAD_PLUGINS picks one[/]")


@command
def describe(
    arch: Annotated[str, typer.Argument(help="Architecture plugin name.")],
    image_size: Annotated[int, typer.Option(help="Input height and width.")] = 32,
    channels: Annotated[int, typer.Option(help="Input channels.")] = 3,
    num_classes: Annotated[int, typer.Option(help="Output classes.")] = 10,
    arch_opt: ArchOpt = None,
):
    """Print an architecture's layers with output shapes and parameter counts."""
    from rich.table import Table

    from .model import describe as layer_rows

    found = plugins_catalog().get("architecture", arch)
    net = found.build(num_classes=num_classes, in_channels=channels, image_size=image_size,
                      **engine.arch_options(found, arch_opt or []))
    rows = layer_rows(net, (channels, image_size, image_size))
    table = Table("layer", "type", "output shape", "params",
                  title=f"{found.name}: {found.summary}", caption=f"input {channels}x{image_size}"
                  f"x{image_size}; total parameters {sum(p.numel() for p in net.parameters()):,}")
    for row in rows:
        table.add_row(row.name, row.kind, " x ".join(map(str, row.output_shape)), f"{row.params:,}")
    out.print(table)
    if found.options:
        accepted = "; ".join(
            f"{name}={values[0]} (or {', '.join(values[1:])})" if isinstance(values, tuple)
            else f"{name}=<text>" + (f" (default {values})" if values else "")
            for name, values in found.options.items())
        out.print(f"--arch-opt: {accepted}", highlight=False, soft_wrap=True)


@command
def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    tracking_uri: TrackingUri = None,
):
    """Start the MLflow UI on the same store, bound to 127.0.0.1."""
    uri = tracking.tracking_uri(tracking_uri)
    err.print(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)", highlight=False)
    # The server's background job runners serve MLflow's GenAI features, not these runs: off
    # unless asked for, as they cost eight processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": uri}
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)], env)


MODEL_HELP = "runs:/<run id>/model, models:/<name>/<version>, or a local MLflow model folder."


def _threads(threads: int | None):
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


@command
def attack(
    model: Annotated[str, typer.Option(help="The model to attack: " + MODEL_HELP)],
    attack_name: Annotated[str, typer.Option(
        "--attack", help="Attack plugin: ifgsm, fgsm, pgd, fool-noise, ... (`cifarx plugins`).")
    ] = "ifgsm",
    eps: Annotated[Optional[str], typer.Option(
        help="Step size (ifgsm 1/255, fool-noise 1/255) or L-inf radius (fgsm, pgd 8/255), in "
             "(0, 1]: 1/255 or 0.0039 (default: the attack's).", show_default=False)] = None,
    confidence: Annotated[Optional[str], typer.Option(
        help="ifgsm, fool-noise: stop when a wrong class (or the target) has this probability, "
             "in (0, 1) (default 0.99).", show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="ifgsm, fool-noise: steps after which an image counts as failed "
             "(default: 200, 500).", show_default=False)] = None,
    alpha: Annotated[Optional[str], typer.Option(
        help="pgd: step size, in (0, 1] (default 2/255).", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="pgd: number of steps (default 10).", show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option(
        help="Targeted (ifgsm, pgd, fool-noise): a class index or name, or next (the class "
             "after the true one) (default: untargeted; fool-noise: each image's class).",
        show_default=False)] = None,
    attack_opt: Annotated[Optional[list[str]], typer.Option(
        help="Any other option of the attack plugin, name=value; repeatable.",
        show_default=False)] = None,
    per_class: Annotated[Optional[int], typer.Option(
        help="Attack this many correctly classified test images of each class (default: 2 "
             "unless --count or --all-test).", show_default=False)] = None,
    count: Annotated[Optional[int], typer.Option(
        help="Attack this many correctly classified test images, any class.",
        show_default=False)] = None,
    all_test: Annotated[bool, typer.Option(
        "--all-test", help="Attack every correctly classified test image.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images attacked at once.")] = 500,
    dataset: DatasetName = "cifar10",
    data_dir: DataDir = None,
    device: Device = "auto",
    seed: Seed = 0,
    threads: Threads = None,
    experiment: Experiment = tracking.DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
):
    """Adversarial images for test images a model gets right; a run linked to the model's run."""
    from . import adversarial
    from .data import resolve_data_dir, resolve_device

    found = plugins_catalog()
    chosen = found.get("attack", attack_name)
    data_plugin = found.get("dataset", dataset)
    given = adversarial.parse_pairs(attack_opt or [])
    for name, text in (("eps", eps), ("confidence", confidence), ("alpha", alpha)):
        if text is not None:
            given[name] = adversarial.parse_fraction(text, name)
    given.update({name: value for name, value in (("max_steps", max_steps), ("steps", steps),
                                                  ("target", target)) if value is not None})
    how = adversarial.selection(per_class, count, all_test)
    _threads(threads)
    target_device = resolve_device(device)

    def started(n: int):
        err.print(f"{chosen.name}: attacking {n:,} images on {target_device}", highlight=False)

    done = adversarial.attack_command(
        model, chosen, data_plugin, resolve_data_dir(data_dir), given, how, batch_size,
        target_device, seed, tracking.tracking_uri(tracking_uri), experiment, run_name, started)
    m, adv_set = done.metrics, done.adv_set
    if len(adv_set["labels"]) <= adversarial.TABLE_IMAGES:
        out.print(adversarial.image_table(adv_set))
    out.print(f"[bold]{chosen.name}[/]: goal reached on [bold green]{m['attack/success_rate']:.1%}"
              f"[/] of {int(m['attack/images']):,} images ({int(m['attack/failures'])} failed), "
              f"misclassified {m['attack/misclassified_rate']:.1%}, "
              f"mean {m['attack/mean_steps']:.1f} steps, L-inf mean "
              f"{m['attack/linf_mean'] * 255:.2f}/255 max {m['attack/linf_max'] * 255:.2f}/255, "
              f"L2 mean {m['attack/l2_mean']:.3f} max "
              f"{m['attack/l2_max']:.3f}, in {duration(m['attack/seconds'])}", soft_wrap=True)
    out.print(f"run {done.run_id}  set {adversarial.SET_ARTIFACT}  figure figures/adversarial.png",
              highlight=False, soft_wrap=True)
    out.print(ui_hint(tracking.tracking_uri(tracking_uri), done.experiment_id, done.run_id),
              highlight=False, soft_wrap=True)


@command
def transfer(
    adversarial_runs: Annotated[list[str], typer.Option(
        "--adversarial", help="Run id of a `cifarx attack` run (or a set.pt file); repeatable.")],
    model: Annotated[list[str], typer.Option(help="A target model: " + MODEL_HELP
                                             + " Repeatable.")],
    device: Device = "auto",
    threads: Threads = None,
    experiment: Experiment = tracking.DEFAULT_EXPERIMENT,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
):
    """Feed stored adversarial images to other models: accuracy and transfer rate, as a run."""
    from . import adversarial
    from .data import resolve_device

    _threads(threads)
    uri = tracking.tracking_uri(tracking_uri)
    done = adversarial.transfer_command(adversarial_runs, model, resolve_device(device), uri,
                                        experiment, run_name)
    out.print(adversarial.transfer_table(done.sources, done.targets, done.cells))
    out.print(f"run {done.run_id}  transfer.json"
              + ("  figures/transfer_matrix.png" if len(done.cells) > 1 else ""),
              highlight=False, soft_wrap=True)
    out.print(ui_hint(uri, done.experiment_id, done.run_id), highlight=False, soft_wrap=True)


def main():
    app(prog_name="cifarx")
