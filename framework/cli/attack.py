"""``cifarx attack`` and ``cifarx transfer``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..tracking.common import DEFAULT_EXPERIMENT
from .common import (MODEL_HELP, AttackOpt, DataDir, DatasetOpt, Description, Device, Experiment,
                     ModelDataset, RunName, Seed, SystemMetrics, Tag, Threads, TrackingUri,
                     TrustPickle, _open_hint, _threads, _tracking, command, plugins_catalog)

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
    robust_accuracy: Annotated[bool, typer.Option(
        "--robust-accuracy", help="Robust accuracy against the radius instead: --eps is a comma "
        "list (0,2/255,8/255), on the first --count test images (default 500), with an attack "
        "bounded by eps (autoattack, pgd, fgsm); a curve and robust/acc per radius.")] = False,
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
    ctx: typer.Context = None,
):
    """Adversarial images for test images a model gets right; a run linked to the model's run."""
    from .. import runs
    from ..inference.adversarial import SET_ARTIFACT, TABLE_IMAGES
    from .console import duration, err, image_table, out

    if robust_accuracy:  # its default attack is autoattack, not ifgsm (which is unbounded)
        if per_class is not None or all_test:
            raise UserError("--robust-accuracy takes the first --count test images; drop "
                            + ("--per-class" if per_class is not None else "--all-test"))
        chosen = ctx is None or getattr(ctx.get_parameter_source("attack_name"), "name",
                                        "DEFAULT") != "DEFAULT"
        _threads(threads)
        return _robust_accuracy(runs.RobustnessConfig(
            model=model, attack=attack_name if chosen else "autoattack",
            eps=tuple(t.strip() for t in (eps or "0,1/255,2/255,4/255,8/255").split(",")
                      if t.strip()),
            attack_options=tuple(attack_opt or ()), count=count or 500,
            batch_size=min(batch_size, 250), dataset=dataset,
            data_dir=str(data_dir) if data_dir else None,
            dataset_options=tuple(dataset_opt or ()), device=device, seed=seed,
            trust_pickle=trust_pickle),
            _tracking(tracking_uri, experiment, run_name, description, tag, system_metrics),
            tracking_uri)
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
    from .. import runs
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


def _robust_accuracy(config, tracking, tracking_uri):
    """``cifarx attack --robust-accuracy``: the robust accuracy at each --eps."""
    from .. import runs
    from .console import err, out

    def heard(text: str, acc: float, seconds: float):
        err.print(f"eps {text}: robust accuracy {acc:.1%} ({seconds:.0f} s)", highlight=False)

    done = runs.robustness_run(config, tracking, plugins_catalog(), heard)
    out.print(f"[bold]{config.attack}[/]: clean accuracy {done.clean_acc:.1%}; robust "
              + ", ".join(f"{c['robust_acc']:.1%} at {c['text']}" for c in done.curve)
              + f"; run {done.run_id}", soft_wrap=True)
    _open_hint(tracking_uri, done.experiment_id, done.run_id)
