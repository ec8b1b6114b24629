"""A sweep: a study's trials run by an executor, as the children of one MLflow run.

Every trial is planned before the sweep's run opens (bad input opens no run). The sweep's run
holds the study (``study.json``), the axes as params, and at the end the summary over seeds
(``sweep.json``, ``sweep.csv``, figures). A sweep is found again by its trials' digest (the same
study run again into the same experiment) or by its run id (``--resume``): only the trials
that are missing, FAILED or KILLED run; a finished trial never runs twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import stats
from .config import OPTION_FLAGS, plan as make_plan, resolve_plugin_options
from .errors import UserError
from .options import OptionError, flag_label, reword, show
from .registry import Catalog, catalog as default_catalog
from .studies import (Configuration, Study, axes_of, configurations, digest, from_dict,
                      raw_of)
from .tracking import quiet_mlflow, start_run, tracking_uri as resolve_uri
from .trials import EXECUTOR_TAG, TRIAL_TAG, Outcome, Trial

SWEEP_TAG = "cifarx.sweep"  # "true" on a sweep's run
DIGEST_TAG = "cifarx.sweep.digest"  # of its trials: the same study finds its sweep again
FAILED_TAG = "cifarx.failed_trials"
STUDY_ARTIFACT = "study.json"


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
    points = configurations(study)
    if not points:
        raise UserError("the study has no configuration: its grid is empty")
    for point in points:
        try:
            make_plan(point.config, catalog)
        except UserError as exc:
            where = ", ".join(f"{k}={show(v)}" for k, v in point.axes.items())
            raise UserError(f"study{' (' + where + ')' if where else ''}: {exc}") from None
    uri = resolve_uri(uri)
    trials = [Trial(key=digest(asdict(config)), number=i, config=config, axes=point.axes,
                    tracking_uri=uri, experiment=study.experiment, parent="",
                    executor=found.name, run_name=trial_name(point.axes, config.seed))
              for i, (point, config) in enumerate(
                  (p, replace(p.config, seed=seed)) for p in points for seed in study.seeds)]
    if found.check is not None:
        try:
            found.check(trials, **values)
        except OptionError as exc:
            raise reword(exc, label, values) from None
    return SweepPlan(study, points, trials, found, values, uri,
                     digest(sorted(t.key for t in trials)))


def trial_name(axes: dict[str, Any], seed: int) -> str:
    return " ".join(f"{k}={show(v)}" for k, v in axes.items()) + f" seed={seed}"


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
        return from_dict(json.loads(Path(path).read_text()), f"--resume {run_id}")


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


def sweep_run(sweep: SweepPlan, resume: str | None = None,
              on_outcome: Callable[[Outcome, int, int], None] | None = None) -> SweepResult:
    """Run the sweep's missing trials under one parent run and log the summary.

    ``resume``: the sweep's run id (else an earlier sweep of the same trials in the experiment,
    if any, is continued). ``on_outcome(outcome, done, total)`` hears each trial as it ends.
    """
    study, uri = sweep.study, sweep.uri
    quiet_mlflow()
    existing = resume or find_sweep(uri, study.experiment, sweep.digest)
    earlier = finished_children(uri, existing) if existing else {}
    tags = {SWEEP_TAG: "true", DIGEST_TAG: sweep.digest, EXECUTOR_TAG: sweep.executor.name}
    name = f"sweep {', '.join(axes_of(study)) or 'seeds'}"
    with start_run(uri, study.experiment, name, tags, existing=existing) as run:
        if not existing:
            run.log_params({
                "search": study.search, "seeds": ",".join(map(str, study.seeds)),
                "executor": sweep.executor.name, "trials": len(sweep.trials),
                "configurations": len(sweep.configurations), "metric": study.metric,
                **{f"executor.{k}": show(v) for k, v in sweep.executor_options.items()},
                **{f"axis.{k}": ",".join(show(v) for v in values)
                   for k, values in study.grid.items()},
                **{f"axis.{k}": json.dumps(spec) for k, spec in study.random.items()},
                **{f"train.{k}": show(v) for k, v in study.train.items()}})
            run.log_dict(raw_of(study), STUDY_ARTIFACT)
            if study.source:
                run.log_text(study.source, "study.toml")
        todo = [replace(t, parent=run.id) for t in sweep.trials if t.key not in earlier]
        outcomes: list[Outcome] = []

        def heard(outcome: Outcome):
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome, len(outcomes), len(todo))

        start = time.perf_counter()
        if todo:
            sweep.executor.run(todo, heard, **sweep.executor_options)
        seconds = time.perf_counter() - start
        result = summarize(sweep, run, outcomes, earlier, seconds)
        experiment_id = run.experiment_id
    result.run_id, result.experiment_id = run.id, experiment_id
    return result


def summarize(sweep: SweepPlan, run, outcomes: list[Outcome], earlier: dict,
              seconds: float) -> SweepResult:
    """The statistics over seeds, logged with the sweep's run."""
    from .figures import sweep_axes, sweep_curves

    study = sweep.study
    by_key = {t.key: t for t in sweep.trials}
    config_of = {t.key: digest(asdict(replace(t.config, seed=0))) for t in sweep.trials}
    finished = [(by_key[key], metrics, curve) for key, (_, metrics, curve) in earlier.items()
                if key in by_key]
    finished += [(o.trial, o.metrics, o.curve) for o in outcomes if o.status == "FINISHED"]
    metrics = list(dict.fromkeys([study.metric, "final/test_acc"]))
    rows = [{"config": config_of[t.key], "axes": dict(t.axes), "seed": t.config.seed,
             "metrics": m} for t, m, _ in finished]
    summary = stats.summarize(rows, metrics) if rows else []
    ranked = stats.rank(summary, study.metric, study.direction) if summary else []
    verdict = stats.verdict(ranked, study.metric) if ranked else "no trial finished"
    failed = [o for o in outcomes if o.status != "FINISHED"]
    public = stats.to_json(summary)
    run.log_dict({"metric": study.metric, "direction": study.direction, "verdict": verdict,
                  "configurations": public,
                  "ranked": [{k: r[k] for k in ("config", "rank", "p_vs_best", "same_as_best")}
                             for r in stats.to_json(ranked)],
                  "failed": [{"trial": o.trial.number, "axes": dict(o.trial.axes),
                              "seed": o.trial.config.seed, "status": o.status,
                              "error": o.error, "run_id": o.run_id} for o in failed]},
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
    if finished:
        best = ranked[0]["config"] if ranked else None
        curves = [(trial_name(t.axes, t.config.seed), config_of[t.key], curve)
                  for t, _, curve in finished]
        run.log_figure(sweep_curves(curves, best, "test accuracy of every trial"),
                       "figures/sweep_curves.png")
    now = int(time.time() * 1000)
    points = [("sweep/trials_finished", len(finished), 0, now),
              ("sweep/trials_failed", len(failed), 0, now), ("sweep/seconds", seconds, 0, now)]
    if ranked:
        points.append((f"best/{study.metric}_mean", ranked[0][f"{study.metric}_mean"], 0, now))
    run.log_points(points)
    run.set_tags({FAILED_TAG: ",".join(str(o.trial.number) for o in failed)} if failed else {})
    return SweepResult("", "", outcomes, len(earlier), summary, ranked, verdict, failed)
