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
``optuna.journal``) that the workers reach: its pruner
(:func:`cifarx.studies.trials.pruning_listener`) stops poor trials early. Such a sweep is not
resumed: each run is a new search.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import UserError
from ..plugin_api.options import show
from ..plugin_api.registry import catalog as default_catalog
from ..tracking.common import NOTE, quiet_mlflow, runs_view
from ..tracking.lifecycle import start_run
from .configurations import config_key
from .study import Study, apply, axes_of, from_dict, raw_of
from .summary import best_note, summarize, trials_view
from .sweep_plan import Search, SweepPlan, SweepResult, run_namer
from .trials import (EXECUTOR_TAG, TRIAL_TAG, Outcome, Pruning, Trial, make_pruner, origin,
                     portable, settle)

SWEEP_TAG = "cifarx.sweep"  # "true" on a sweep's run
DIGEST_TAG = "cifarx.sweep.digest"  # of its trials: the same study finds its sweep again

EXECUTOR_OPTIONS_TAG = "cifarx.executor.options"  # JSON: what a resume runs on, unless told
STUDY_ARTIFACT = "study.json"


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

    from ..runs.train import CHECKPOINT

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
    # named by what it varies; one configuration over seeds, by its study (experiment)
    name = f"sweep {', '.join(axes_of(study)) or f'{study.experiment}, {len(study.seeds)} seeds'}"
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
                # a JSON list: exact when a value holds commas (["raw", "normalize,flip"])
                **{f"axis.{k}": json.dumps([show(v) for v in values])
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
            settle(outcome)  # a trial's run says how it ended, whatever the executor
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


def register_model(run_id: str, name: str) -> str:
    """Add ``runs:/<run_id>/model`` to the Model Registry as ``name``; the new version."""
    import mlflow

    from ..tracking.models import describe_version

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

    from ..cli.console import err

    study, search = sweep.study, sweep.search
    where = origin()
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
            settle(outcome)
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
                                  config=portable(config_seed), axes=axes,
                                  tracking_uri=sweep.uri, experiment=study.experiment,
                                  parent=run.id, executor=sweep.executor.name,
                                  run_name=run_namer(study)(axes, seed), pruning=pruning,
                                  **where)
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
    from ..figures import plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (Optuna, PED-ANOVA; sums to 1)")
    ax.set_xlim(0, 1)
    ax.set_title("what the metric depends on")
    fig.tight_layout()
    return fig
