"""``cifarx sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import (Description, ExecutorOpt, Tag, TrackingUri, _open_hint, _tracking, command,
                     plugins_catalog)


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
    baseline: Annotated[Optional[list[str]], typer.Option(
        help="KEY=VALUE (repeatable): the configuration every other is tested against, as "
             "the study's baseline = {KEY = VALUE} (default: the study's, else the best).",
        show_default=False)] = None,
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
    from ..studies import flags as study_flags, study as studies
    from ..studies.sweep import load_resumed, sweep_run
    from ..studies.sweep_plan import plan_sweep, trial_name
    from ..tracking.common import tracking_uri as resolve_uri
    from .console import err, out, print_whole, sweep_table

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
        raw = study_flags.with_flags(raw, grid or [], set_ or [])
        study = studies.from_dict(raw, str(study_file or "the command line"),
                                  study.source if study_file else "")
    study = study_flags.overrides(study, seeds=seeds, search=search, trials=trials, metric=metric,
                              direction=direction, experiment=experiment)
    if baseline:
        study = study_flags.with_baseline(study, baseline)
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
