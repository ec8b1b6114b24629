"""A sweep: a study's trials run by an executor, as the children of one MLflow run.

Every trial is planned before the sweep's run opens (bad input opens no run). The sweep's run
holds the study (``study.json``), the axes as params, and at the end the summary over seeds
(``sweep.json``, ``sweep.csv``, figures). A sweep is found again by its trials' digest (the same
study run again into the same experiment) or by its run id (``--resume``): only the trials
that are missing, FAILED or KILLED run; a finished trial never runs twice.

A tpe search (``search = "tpe"``) asks Optuna's TPE sampler (seeded by ``search-seed``) for
configurations through its ask/tell interface: first the sampler's random start (its first
``TPE_STARTUP`` configurations, which do not depend on results; planned and checked before the
run opens, and listed by ``--dry-run``), then as many as the executor runs at once
(:func:`parallelism`), until ``trials`` configurations. A configuration's value is the mean of
the metric over its seeds, told as soon as its last seed ends; one FAILED seed fails it. The
study lives in an Optuna journal file in a temporary folder (logged with the sweep as
``optuna.journal``) that the workers reach: its pruner (:func:`cifarx.trials.pruning_listener`)
stops poor trials early. Such a sweep is not resumed: each run is a new search.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from . import stats
from .config import OPTION_FLAGS, plan as make_plan, resolve_plugin_options
from .errors import UserError
from .options import OptionError, brief, flag_label, reword, show
from .registry import Catalog, catalog as default_catalog
from .studies import (OPTION_KEYS, Configuration, Study, apply, axes_of, config_key,
                      configurations, digest, field_name, from_dict, pruner_warmup, raw_of)
from .tracking import (NOTE, quiet_mlflow, runs_view, start_run, tracking_uri as resolve_uri,
                       ui_page)
from .trials import EXECUTOR_TAG, TRIAL_TAG, Outcome, Pruning, Trial, make_pruner

SWEEP_TAG = "cifarx.sweep"  # "true" on a sweep's run
DIGEST_TAG = "cifarx.sweep.digest"  # of its trials: the same study finds its sweep again
FAILED_TAG = "cifarx.failed_trials"
EXECUTOR_OPTIONS_TAG = "cifarx.executor.options"  # JSON: what a resume runs on, unless told
STUDY_ARTIFACT = "study.json"
TPE_STARTUP = 10  # configurations the TPE sampler draws at random before it models results
# what a tpe search can optimize (a trial's outcome has these), and the curve its pruner follows
SEARCH_METRICS = {"final/test_acc": "test/acc", "final/test_loss": "test/loss",
                  "final/train_seconds": None, "final/images_per_second": None,
                  "val/acc": "val/acc", "val/loss": "val/loss"}  # with val-split in [train]


@dataclass
class SweepPlan:
    """A sweep checked: its trials, the executor and its options, no run opened."""

    study: Study
    configurations: list[Configuration]
    trials: list[Trial]  # every trial; parent filled in when the run opens
    executor: Any
    executor_options: dict[str, Any]
    uri: str
    digest: str
    search: Search | None = None  # a tpe search: its sampler and space


@dataclass
class Search:
    """A tpe search, planned: the seeded sampler (it drew ``first``), each axis's Optuna
    distribution, the pruner."""

    sampler: Any
    distributions: dict[str, Any]
    encoded: dict[str, dict[str, Any]]  # axis -> {choice as Optuna holds it: value as written}
    first: list[dict[str, Any]]  # the first configurations' Optuna params
    pruner: tuple | None  # ("median", startup, warmup), or None
    curve: str | None  # what the pruner follows

    def axes(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's params as the study's axis values."""
        return {k: self.encoded[k][params[k]] if k in self.encoded else params[k]
                for k in self.distributions}


@dataclass
class SweepResult:
    run_id: str
    experiment_id: str
    outcomes: list[Outcome]  # this invocation's
    reused: int  # trials finished by an earlier invocation, not run again
    summary: list[dict[str, Any]]
    ranked: list[dict[str, Any]]
    verdict: str
    failed: list[Outcome] = field(default_factory=list)
    best_run: str | None = None  # the best configuration's best seed's run


def plan_sweep(study: Study, executor: str = "local", executor_options=(),
               option_flags: dict[str, str] | None = None, uri: str | None = None,
               catalog: Catalog | None = None) -> SweepPlan:
    """Check the whole sweep: every configuration planned, the executor and its options."""
    catalog = catalog or default_catalog()
    found = catalog.get("executor", executor)
    flags = option_flags or {}
    label = lambda name: flags.get(name) or flag_label(  # noqa: E731
        OPTION_FLAGS["executor"][0], None, name)
    values = resolve_plugin_options("executor", found, executor_options, label)
    search = plan_search(study, found.name, values) if study.search == "tpe" else None
    checked = configurations(study)  # tpe: every choice and both ends of every range
    points = configurations(study, [search.axes(p) for p in search.first]) if search else checked
    if not points:
        raise UserError("the study has no configuration: its grid is empty")
    for point in (checked + points if search else points):
        try:
            make_plan(point.config, catalog)
        except UserError as exc:
            where = ", ".join(f"{k}={show(v)}" for k, v in point.axes.items())
            raise UserError(f"study{' (' + where + ')' if where else ''}: {exc}") from None
    uri = resolve_uri(uri)
    run_name_of = run_namer(study)
    trials = [Trial(key=config_key(config), number=i, config=config, axes=point.axes,
                    tracking_uri=uri, experiment=study.experiment, parent="",
                    executor=found.name, run_name=run_name_of(point.axes, config.seed))
              for i, (point, config) in enumerate(
                  (p, replace(p.config, seed=seed)) for p in points for seed in study.seeds)]
    if found.check is not None:
        try:
            found.check(trials, **values)
        except OptionError as exc:
            raise reword(exc, label, values) from None
    return SweepPlan(study, points, trials, found, values, uri,
                     digest(raw_of(study)) if search else digest(sorted(t.key for t in trials)),
                     search)


def parallelism(executor: str, options: dict[str, Any]) -> int:
    """Trials an executor runs at once, as far as the sweep can tell: ``workers`` where the
    executor has that option; for ray, this machine's CPUs over ``trial_cpus``; else 1."""
    if "workers" in options:
        return max(1, int(options["workers"]))
    if executor == "ray":
        return max(1, int((os.cpu_count() or 1) // max(float(options.get("trial_cpus", 1)),
                                                        1e-9)))
    return 1


def plan_search(study: Study, executor: str, options: dict[str, Any]) -> Search:
    """The tpe search's space, sampler and pruner; its first configurations drawn."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if study.metric not in SEARCH_METRICS:
        raise UserError(f"metric = {study.metric!r}: a tpe search optimizes what every trial "
                        f"reports: {', '.join(SEARCH_METRICS)}")
    pruner = None if study.pruner == "none" else ("median", study.pruner_startup,
                                                   pruner_warmup(study))
    curve = SEARCH_METRICS[study.metric]
    if pruner and curve is None:
        raise UserError(f"pruner = \"median\" follows the metric's test curve, and "
                        f"{study.metric} has none; set pruner = \"none\"")
    if pruner and remote_workers(executor, options):
        raise UserError("pruning needs the workers to reach the search's journal file on this "
                        "machine, which a remote Ray cluster's nodes cannot; set pruner = "
                        "\"none\" in the study")
    distributions, encoded = {}, {}
    specs = {**{k: {"choice": list(v)} for k, v in study.grid.items()}, **study.random}
    for key, spec in specs.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in args)
            choices = list(args) if plain else list(dict.fromkeys(json.dumps(v) for v in args))
            if not plain:
                encoded[key] = {json.dumps(v): v for v in args}
            distributions[key] = optuna.distributions.CategoricalDistribution(choices)
        elif kind == "int":
            distributions[key] = optuna.distributions.IntDistribution(int(args[0]), int(args[1]))
        else:
            distributions[key] = optuna.distributions.FloatDistribution(
                float(args[0]), float(args[1]), log=kind == "log-uniform")
    running = max(1, math.ceil(parallelism(executor, options) / len(study.seeds)))
    # constant_liar: a configuration still running counts as a poor result, so that the
    # configurations asked while others run are not drawn next to them
    sampler = optuna.samplers.TPESampler(seed=study.search_seed, n_startup_trials=TPE_STARTUP,
                                         constant_liar=True)
    drawing = optuna.create_study(sampler=sampler, direction=study.direction)
    first = [drawing.ask(distributions).params
             for _ in range(min(study.trials, max(running, TPE_STARTUP)))]
    return Search(sampler, distributions, encoded, first, pruner, curve)


def remote_workers(executor: str, options: dict[str, Any]) -> bool:
    """Whether the executor runs trials on other machines (ray at a remote address)."""
    if executor != "ray":
        return False
    from .plugins.executors import host_port, is_remote

    given = options.get("address") or os.environ.get("RAY_ADDRESS", "")
    if not given or given == "auto":
        return False
    try:
        return is_remote(host_port(given)[0])
    except ValueError:
        return False


def trial_name(axes: dict[str, Any], seed: int) -> str:
    return " ".join([*(f"{k}={show(v)}" for k, v in axes.items()), f"seed={seed}"])


# The usual short names of the options whose full names crowd a run name
SHORT_NAMES = {"optimizer": "opt", "weight-decay": "wd", "momentum": "mom", "schedule": "sched",
               "activation": "act", "label-smoothing": "ls", "batch-size": "bs"}


def axis_values(study: Study) -> dict[str, list[Any]]:
    """Every value the study gives each axis (its grid and its listed configurations); a
    drawn axis ([random]) has none."""
    values: dict[str, list[Any]] = {k: list(v) for k, v in study.grid.items()}
    for point in study.configurations:
        for k, v in point.items():
            values.setdefault(k, []).append(v)
    return values


def run_namer(study: Study) -> Callable[[Mapping[str, Any], int | None], str]:
    """The study's trial run names (:func:`trial_run_name`), leaving out the axes that take one
    value in every configuration (they tell no trial apart)."""
    values = axis_values(study)
    listed = {k: sum(k in point for point in study.configurations) for k in values}
    fixed = {k for k, v in values.items() if len({repr(x) for x in v}) == 1
             and (k in study.grid or listed[k] == len(study.configurations))}
    return lambda axes, seed: trial_run_name(
        {k: v for k, v in axes.items() if k not in fixed}, seed, values)


def trial_run_name(axes: Mapping[str, Any], seed: int | None,
                   values: Mapping[str, list[Any]] | None = None) -> str:
    """A trial's run name, short enough for the MLflow runs table (about 30 characters show):
    each axis as name=value, seed last: ``aug=+mixup lr=0.1 s1`` (no seed: None). The name is
    the option's last part (``act`` for ``arch-opt.activation``: the usual short names of
    ``SHORT_NAMES``), unless two axes end alike; a list value drops the items that every value
    of its axis has (``values``: the study's), shown after a ``+`` (``normalize,flip,crop,mixup``
    among others with ``normalize,flip,crop``: ``+mixup``); a drawn number keeps 3 digits. The
    params hold the values in full."""
    values = values or {}
    ends = [k.rsplit(".", 1)[-1] for k in axes]
    parts = []
    for key, end in zip(axes, ends):
        value = axes[key]
        name = SHORT_NAMES.get(end, end) if ends.count(end) == 1 else key
        if key not in values and isinstance(value, float):
            shown = f"{value:.3g}"
        else:
            shown = _without_shared(value, values.get(key, [])) or brief(value)
        parts.append(f"{name}={shown}")
    return " ".join([*parts, *([] if seed is None else [f"s{seed}"])])


def _without_shared(value: Any, others: list[Any]) -> str | None:
    """``+item,...``: a list value's items that not every one of ``others`` has; None when
    it is not a list, or has no shared items, or nothing but shared ones."""
    def items(v):
        if isinstance(v, (list, tuple)):
            return [show(i) for i in v]
        return [i.strip() for i in v.split(",")] if isinstance(v, str) else None

    mine, lists = items(value), [items(o) for o in others]
    if mine is None or len(lists) < 2 or any(x is None for x in lists):
        return None
    shared = set.intersection(*(set(x) for x in lists))
    rest = [i for i in mine if i not in shared]
    return "+" + ",".join(rest) if rest and len(rest) < len(mine) else None


def find_sweep(uri: str, experiment: str, sweep_digest: str) -> str | None:
    """The run of an earlier sweep of the same trials in this experiment, if any."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{DIGEST_TAG}` = '{sweep_digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def load_resumed(run_id: str, uri: str) -> Study:
    """The study of the sweep run ``run_id`` (``--resume``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--resume {run_id}: no such run in {uri}") from None
    if run.data.tags.get(SWEEP_TAG) != "true":
        raise UserError(f"--resume {run_id}: run {run.info.run_name!r} is not a sweep (it has no "
                        f"tag {SWEEP_TAG}); accepted: the run id a `cifarx sweep` printed")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, STUDY_ARTIFACT, tmp)
        study = from_dict(json.loads(Path(path).read_text()), f"--resume {run_id}")
    # the executor and options it last ran on (flags still win); older sweeps: their params
    tags, params = run.data.tags, run.data.params
    if EXECUTOR_OPTIONS_TAG in tags:
        study = replace(study, executor={"name": tags[EXECUTOR_TAG],
                                         **json.loads(tags[EXECUTOR_OPTIONS_TAG])})
    elif "executor" in params:
        study = replace(study, executor={"name": params["executor"], **{
            k[len("executor."):]: v for k, v in params.items() if k.startswith("executor.")}})
    if study.search == "tpe":
        raise UserError(f"--resume {run_id}: a tpe search is not resumed; run its study again "
                        "for a new search")
    return study


def finished_children(uri: str, parent: str) -> dict[str, Outcome]:
    """The FINISHED trials of a sweep run, by trial key, as outcomes (metrics and curve)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    done = {}
    for run in client.search_runs([experiment], max_results=10000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                "attributes.status = 'FINISHED'"):
        key = run.data.tags.get(TRIAL_TAG)
        if key:
            curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                        "test/acc")]
            done[key] = (run.info.run_id, dict(run.data.metrics), sorted(curve))
    return done


def resumable_children(uri: str, parent: str) -> dict[str, str]:
    """The KILLED (or left RUNNING by a kill) trials of a sweep run that have a checkpoint:
    trial key -> run id, the latest run of each key."""
    import mlflow

    from .runs import CHECKPOINT

    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    found = {}
    for run in client.search_runs([experiment], max_results=10000, order_by=[
            "attributes.start_time ASC"], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        key = run.data.tags.get(TRIAL_TAG)
        if key and run.info.status in ("KILLED", "RUNNING") and any(a.path == CHECKPOINT for a in
                       client.list_artifacts(run.info.run_id, "checkpoints")):
            found[key] = run.info.run_id
    return found


def sweep_run(sweep: SweepPlan, resume: str | None = None,
              on_outcome: Callable[[Outcome, int, int], None] | None = None,
              register: str | None = None, description: str | None = None,
              user_tags: Mapping[str, str] | None = None,
              on_start: Callable[[str, int, int], None] | None = None) -> SweepResult:
    """Run the sweep's missing trials under one parent run and log the summary.

    ``resume``: the sweep's run id (else an earlier sweep of the same trials in the experiment,
    if any, is continued). ``on_outcome(outcome, done, total)`` hears each trial as it ends.
    ``register``: add the best trial's model (the best configuration's best seed) to the
    Model Registry under this name. ``description`` and ``user_tags`` go on the sweep's run.
    ``on_start(run_id, to_run, finished_earlier)`` hears the sweep open (a search: to_run is
    its total).
    """
    study, uri = sweep.study, sweep.uri
    quiet_mlflow()
    existing = resume or (None if sweep.search else
                          find_sweep(uri, study.experiment, sweep.digest))
    earlier = finished_children(uri, existing) if existing else {}
    package, version = default_catalog().origin("executor", sweep.executor.name)
    tags = {SWEEP_TAG: "true", DIGEST_TAG: sweep.digest, EXECUTOR_TAG: sweep.executor.name,
            EXECUTOR_OPTIONS_TAG: json.dumps(sweep.executor_options, sort_keys=True),
            f"cifarx.plugin.executor.{sweep.executor.name}": f"{package}=={version}"}
    name = f"sweep {', '.join(axes_of(study)) or 'seeds'}"
    total = study.trials * len(study.seeds) if sweep.search else len(sweep.trials)
    description = description or f"Study {study.experiment}: {total} trials, " \
        f"{study.search} search over {', '.join(axes_of(study)) or 'seeds'}"
    with start_run(uri, study.experiment, name, {**tags, **(user_tags or {})}, existing=existing,
                   description=description) as run:
        if not existing:
            run.log_params({
                "search": study.search, "seeds": ",".join(map(str, study.seeds)),
                "executor": sweep.executor.name,
                "trials": study.trials * len(study.seeds) if sweep.search else len(sweep.trials),
                "configurations": study.trials if sweep.search else len(sweep.configurations),
                "metric": study.metric,
                **({"pruner": ",".join(map(str, sweep.search.pruner or ("none",))),
                    "search_seed": study.search_seed}
                   if sweep.search else {}),
                **{f"executor.{k}": show(v) for k, v in sweep.executor_options.items()},
                **{f"axis.{k}": ",".join(show(v) for v in values)
                   for k, values in study.grid.items()},
                **{f"axis.{k}": json.dumps(spec) for k, spec in study.random.items()},
                **{f"train.{k}": show(v) for k, v in study.train.items()}})
            run.log_dict(raw_of(study), STUDY_ARTIFACT)
            if study.source:
                run.log_text(study.source, "study.toml")
        interrupted = resumable_children(uri, existing) if existing else {}
        todo = [replace(t, parent=run.id, resume=interrupted.get(t.key))
                for t in sweep.trials if t.key not in earlier]
        outcomes: list[Outcome] = []
        if on_start is not None:
            on_start(run.id, total if sweep.search else len(todo), len(earlier))

        def heard(outcome: Outcome):
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome, len(outcomes), len(todo))

        start = time.perf_counter()
        if sweep.search is not None:
            result = run_search(sweep, run, on_outcome, start)
        else:
            if todo:
                sweep.executor.run(todo, heard, **sweep.executor_options)
            seconds = time.perf_counter() - start
            result = summarize(sweep, run, outcomes, earlier, seconds)
        ending = {}
        if register and result.best_run:
            version = register_model(result.best_run, register)
            ending[REGISTERED_TAG] = f"{register}/{version}"
        experiment_id = run.experiment_id
        longest = max((len(t.run_name or "") for t in sweep.trials), default=30)
        run.save_view(f"cifarx-{run.id}", trials_view(study, run.id, name, longest))
        run.save_view("cifarx-sweeps", runs_view(
            "sweeps", [f"metrics.`best/{study.metric}_mean`", "params.`configurations`",
                       "params.`seeds`", "params.`metric`"], f"tags.`{SWEEP_TAG}` = 'true'"))
        ending[NOTE] = f"{description}\n\n{best_note(study, result, experiment_id, run.id)}"
        run.set_tags(ending)
    result.run_id, result.experiment_id = run.id, experiment_id
    return result


REGISTERED_TAG = "cifarx.registered_model"  # on a sweep: NAME/VERSION of its best trial's


def param_of(axis: str) -> str:
    """The MLflow param that holds a study key's value: ``lr`` -> ``lr``, ``eval-every`` ->
    ``eval_every``, ``arch-opt.activation`` -> ``arch.activation``."""
    head, _, rest = axis.partition(".")
    if head in OPTION_KEYS:
        return f"{head.removesuffix('-opt')}.{rest}"
    name = field_name(axis, "study")
    return "probe" if name == "probes" else name


def trials_view(study: Study, run_id: str, name: str, longest: int = 30) -> str:
    """The runs table of a sweep's trials (a saved view, see :func:`cifarx.tracking.runs_view`):
    its trials alone, best first, with the axes, the seed and the metric as columns, the Run
    Name column wide enough for ``longest`` characters (within 190 to 480 pixels)."""
    metrics = list(dict.fromkeys([study.metric, "final/test_acc"]))
    columns = [f"params.`{param_of(a)}`" for a in axes_of(study)] + ["params.`seed`"] + \
        [f"metrics.`{m}`" for m in metrics]
    return runs_view(f"{name}: trials ({run_id[:8]})", columns,
                     f"tags.`mlflow.parentRunId` = '{run_id}'", f"metrics.`{study.metric}`",
                     ascending=study.direction == "minimize",
                     name_width=min(480, max(190, 60 + 7 * longest)))


def best_note(study: Study, result: SweepResult, experiment_id: str, run_id: str) -> str:
    """The sweep's description's last paragraph: the best configuration, linked to its best
    seed's run, its mean; and a link to the trials' table (markdown, for the MLflow UI)."""
    table = f"[all trials, best first]({ui_page(experiment_id, view=f'cifarx-{run_id}')})"
    if not result.ranked:
        return f"No trial finished; {table}."
    best = result.ranked[0]
    axes = {name: best[name] for name in best["_axes"]}  # summary rows hold each axis's value
    label = run_namer(study)(axes, None) or "the configuration"
    if result.best_run:
        label = f"[{label}]({ui_page(experiment_id, result.best_run)})"
    mean, n = best[f"{study.metric}_mean"], best[f"{study.metric}_n"]
    return (f"**Best**: {label}, {study.metric} mean {mean:.4g} over {n} seed(s) (the link "
            f"opens its best seed's run); {table}.")


def register_model(run_id: str, name: str) -> str:
    """Add ``runs:/<run_id>/model`` to the Model Registry as ``name``; the new version."""
    import mlflow

    from .tracking import describe_version

    version = mlflow.register_model(f"runs:/{run_id}/model", name)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    logged = run.outputs.model_outputs if run.outputs else []
    if logged:  # the logged model's description goes with it
        note = client.get_logged_model(logged[0].model_id).tags.get(NOTE)
        describe_version(client, name, str(version.version), note)
    return version.version


def run_search(sweep: SweepPlan, run, on_outcome, start: float) -> SweepResult:
    """A tpe search: ask, run, tell, until ``trials`` configurations; then the summary, the
    Optuna study's best and the parameters' importances, logged with the sweep's run."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from .console import err

    study, search = sweep.study, sweep.search
    if study.metric.startswith(("final/test_", "test/")):
        err.print(f"cifarx: warning: the search selects on {study.metric}, measured on the test "
                  "set: the best configuration's test accuracy is optimistic; select on val/acc "
                  "with val-split in the study's [train] table", highlight=False, soft_wrap=True)
    total = study.trials * len(study.seeds)
    ran: list[Trial] = []
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cifarx-search-") as tmp:
        journal = str(Path(tmp) / "optuna.journal")
        storage = JournalStorage(JournalFileBackend(journal))
        name = f"sweep-{run.id}"
        ostudy = optuna.create_study(study_name=name, storage=storage, sampler=search.sampler,
                                     pruner=make_pruner(search.pruner),
                                     direction=study.direction)
        for params in search.first:  # as planned (and checked) before the run opened
            ostudy.enqueue_trial(params)
        waiting: dict[int, tuple[Any, list[Outcome]]] = {}  # cifarx trial number -> group

        def heard(outcome: Outcome):
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome, len(outcomes), total)
            otrial, group = waiting.pop(outcome.trial.number)
            group.append(outcome)
            if len(group) == len(study.seeds):
                tell(ostudy, otrial, group, study.metric)

        def trials():
            """Each configuration asked when the executor can start its first seed: Optuna
            has heard every configuration that ended before."""
            for _ in range(study.trials):
                otrial = ostudy.ask(search.distributions)
                axes = search.axes(otrial.params)
                group: list[Outcome] = []
                config = apply({**study.train, **axes}, "study")
                for i, seed in enumerate(study.seeds):
                    config_seed = replace(config, seed=seed)
                    pruning = Pruning(journal, name, otrial._trial_id, search.pruner,
                                      search.curve, report=i == 0, last=config.iters
                                      ) if search.pruner else None
                    trial = Trial(key=config_key(config_seed), number=len(ran),
                                  config=config_seed, axes=axes, tracking_uri=sweep.uri,
                                  experiment=study.experiment, parent=run.id,
                                  executor=sweep.executor.name,
                                  run_name=run_namer(study)(axes, seed), pruning=pruning)
                    ran.append(trial)
                    waiting[trial.number] = (otrial, group)
                    yield trial

        sweep.executor.run(trials(), heard, **sweep.executor_options)
        for otrial in {o.number: o for o, _ in waiting.values()}.values():
            ostudy.tell(otrial, state=TrialState.FAIL)  # a trial the executor never reported
        seconds = time.perf_counter() - start
        info = search_summary(ostudy, search, run)
        run.log_artifact(journal)
    return summarize(replace(sweep, trials=ran), run, outcomes, {}, seconds, info)


def tell(ostudy, otrial, group: list[Outcome], metric: str):
    """A configuration's result to Optuna: pruned if any seed was, failed if any seed failed
    (or lacks the metric), else the metric's mean over the seeds."""
    from optuna.trial import TrialState

    values = [o.metrics.get(metric) for o in group if o.status == "FINISHED"]
    if any(o.status == "PRUNED" for o in group):
        ostudy.tell(otrial, state=TrialState.PRUNED)
    elif len(values) == len(group) and all(v is not None and math.isfinite(v) for v in values):
        ostudy.tell(otrial, sum(values) / len(values))
    else:
        ostudy.tell(otrial, state=TrialState.FAIL)


def search_summary(ostudy, search: Search, run) -> dict[str, Any]:
    """The Optuna study's trials, best and parameter importances (and their figure)."""
    import optuna
    from optuna.trial import TrialState

    trials = ostudy.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value if ostudy.direction.name == "MAXIMIZE"
               else -t.value) if complete else None
    info: dict[str, Any] = {
        "sampler": "tpe", "pruner": list(search.pruner) if search.pruner else None,
        "pruned_curve": search.curve if search.pruner else None,
        "first": len(search.first),
        "best": {"number": best.number, "params": search.axes(best.params),
                 "value": best.value} if best else None,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                    "params": search.axes(t.params) if t.params else {}} for t in trials],
        "importances": None}
    if len(complete) >= 2 and search.distributions:
        try:
            importances = optuna.importance.get_param_importances(ostudy)
        except Exception as exc:  # too few distinct results, ...
            info["importances_error"] = f"{type(exc).__name__}: {exc}"
        else:
            info["importances"] = importances
            run.log_figure(importance_figure(importances), "figures/sweep_importances.png")
    return info


def importance_figure(importances: dict[str, float]):
    from .figures import plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (Optuna, PED-ANOVA; sums to 1)")
    ax.set_xlim(0, 1)
    ax.set_title("what the metric depends on")
    fig.tight_layout()
    return fig


def summarize(sweep: SweepPlan, run, outcomes: list[Outcome], earlier: dict,
              seconds: float, search: dict[str, Any] | None = None) -> SweepResult:
    """The statistics over seeds, logged with the sweep's run. Pruned trials are left out of
    the statistics (listed as ``pruned``; their curves are drawn)."""
    from .figures import sweep_axes, sweep_curves

    study = sweep.study
    by_key = {t.key: t for t in sweep.trials}
    config_of = {t.key: config_key(replace(t.config, seed=0)) for t in sweep.trials}
    finished = [(by_key[key], metrics, curve) for key, (_, metrics, curve) in earlier.items()
                if key in by_key]
    finished += [(o.trial, o.metrics, o.curve) for o in outcomes if o.status == "FINISHED"]
    run_of = {key: run_id for key, (run_id, _, _) in earlier.items()}
    run_of.update({o.trial.key: o.run_id for o in outcomes if o.status == "FINISHED"})
    metrics = list(dict.fromkeys([study.metric, "final/test_acc"]))
    rows = [{"config": config_of[t.key], "axes": dict(t.axes), "seed": t.config.seed,
             "metrics": m} for t, m, _ in finished]
    summary = stats.summarize(rows, metrics) if rows else []
    # a study of one seed ranks its single values; with more, a configuration left with one
    # (a failed seed) is not ranked
    ranked = stats.rank(summary, study.metric, study.direction,
                        min_n=min(2, len(study.seeds))) if summary else []
    verdict = stats.verdict(ranked, study.metric) if ranked else "no trial finished"
    done_keys = {t.key for t, _, _ in finished} | {o.trial.key for o in outcomes
                                                    if o.status == "PRUNED"}
    missing = [t for t in sweep.trials if t.key not in done_keys] if not sweep.search else []
    if missing:  # say which seeds the statistics lack, and how to get them
        shown = "; ".join(trial_name(t.axes, t.config.seed) for t in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        verdict += (f" Missing {len(missing)} trial(s): {shown}{more}; `cifarx sweep --resume "
                    f"{run.id}` runs them again.")
    failed = [o for o in outcomes if o.status not in ("FINISHED", "PRUNED")]
    pruned = [o for o in outcomes if o.status == "PRUNED"]
    public = stats.to_json(summary)
    run.log_dict({"metric": study.metric, "direction": study.direction, "verdict": verdict,
                  "configurations": public,
                  "ranked": [{k: r[k] for k in ("config", "rank", "p_vs_best", "same_as_best")}
                             for r in stats.to_json(ranked)],
                  "failed": [{"trial": o.trial.number, "axes": dict(o.trial.axes),
                              "seed": o.trial.config.seed, "status": o.status,
                              "error": o.error, "run_id": o.run_id} for o in failed],
                  **({"pruned": [{"trial": o.trial.number, "axes": dict(o.trial.axes),
                                  "seed": o.trial.config.seed, "why": o.error,
                                  "run_id": o.run_id} for o in pruned], "search": search}
                     if search is not None else {})},
                 "sweep.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.csv"
        stats.to_csv(ranked or summary, path)  # best first, with rank and p vs the best
        run.log_artifact(path)
    axes = axes_of(study)
    if summary and axes:
        run.log_figure(sweep_axes(summary, axes, study.metric,
                                  f"{study.metric} over seeds (mean, 95% interval)"),
                       "figures/sweep_axes.png")
    if finished or pruned:
        best = ranked[0]["config"] if ranked else None
        curves = [(trial_name(t.axes, t.config.seed), config_of[t.key], curve)
                  for t, _, curve in finished]
        curves += [(trial_name(o.trial.axes, o.trial.config.seed) + " (pruned)",
                    config_of[o.trial.key], o.curve) for o in pruned]
        run.log_figure(sweep_curves(curves, best, "test accuracy of every trial"),
                       "figures/sweep_curves.png")
    now = int(time.time() * 1000)
    # each invocation's time at its own step (a resume adds one), and their sum
    import mlflow

    spent = [m.value for m in mlflow.MlflowClient(sweep.uri).get_metric_history(
        run.id, "sweep/seconds")]
    points = [("sweep/trials_finished", len(finished), 0, now),
              ("sweep/trials_failed", len(failed), 0, now),
              ("sweep/seconds", seconds, len(spent), now),
              ("sweep/total_seconds", sum(spent) + seconds, 0, now)]
    if search is not None:
        points.append(("sweep/trials_pruned", len(pruned), 0, now))
    if ranked and ranked[0]["rank"] is not None:
        points.append((f"best/{study.metric}_mean", ranked[0][f"{study.metric}_mean"], 0, now))
    run.log_points(points)
    # set every time: a resume that completes the failed trials clears it
    run.set_tags({FAILED_TAG: ",".join(str(o.trial.number) for o in failed) or "none"})
    best_run = None
    if ranked and ranked[0]["rank"] is not None:  # of the best configuration's seeds, the
        # one with the best metric
        sign = 1 if study.direction == "maximize" else -1
        seeds = [(sign * m[study.metric], run_of.get(t.key)) for t, m, _ in finished
                 if config_of[t.key] == ranked[0]["config"] and study.metric in m]
        best_run = max(seeds, key=lambda s: s[0])[1] if seeds else None
    return SweepResult("", "", outcomes, len(earlier), summary, ranked, verdict, failed,
                       best_run)
