"""A sweep's trials: what one is, and how a worker runs it.

A :class:`Trial` is picklable and self-contained: an executor (a local process pool, a Ray
cluster, a plugin's scheduler) hands it to :func:`run_trial` in a worker, which trains it as an
ordinary cifarx training run, the child of the sweep's run, and returns an :class:`Outcome`.
A trial that raises or diverges is a FAILED outcome, never an exception: the sweep carries on.
A trial of a search with a pruner (:class:`Pruning`) reports its test curve to the search's
Optuna study and stops when the pruner says so: a PRUNED outcome, its run FINISHED.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..training.config import TrainConfig

# Tags on a trial's run: the sweep finds its trials again by them (resume).
TRIAL_TAG = "cifarx.trial"  # the trial's key: a digest of its config, seed included
EXECUTOR_TAG = "cifarx.executor"


@dataclass(frozen=True)
class Trial:
    """One training of a sweep: ``config`` (seed included), the swept values as the study wrote
    them (``axes``), and where to log (the sweep's store, experiment and run)."""

    key: str
    number: int  # position in the sweep, from 0
    config: TrainConfig
    axes: Mapping[str, Any]
    tracking_uri: str
    experiment: str
    parent: str  # the sweep's run id
    executor: str
    run_name: str | None = None
    pruning: Pruning | None = None  # a tpe search's pruner watches this trial
    resume: str | None = None  # the run of this trial that was interrupted: continue it
    # The sweep's settings from its environment (CIFARX_DATA_DIR, ...: see
    # :func:`environment`), set in the worker that runs it: a Ray node or a plugin's
    # scheduler does not inherit the sweep's environment.
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = ""  # the machine the sweep runs on: a failure elsewhere names its own


def portable(config: TrainConfig) -> TrainConfig:
    """``config`` with a relative data folder made absolute: a worker may run elsewhere (a Ray
    worker starts in a folder of its own)."""
    from dataclasses import replace

    if config.data_dir and not os.path.isabs(os.path.expanduser(config.data_dir)):
        return replace(config, data_dir=os.path.abspath(config.data_dir))
    return config


def origin() -> dict[str, Any]:
    """What every trial of a sweep started here carries: ``env`` and ``host``."""
    return {"env": environment(), "host": socket.gethostname()}


def environment() -> dict[str, str]:
    """The cifarx settings of this process's environment (every ``CIFARX_*`` variable) that a
    trial needs wherever it runs, a data folder given relative to this one made absolute."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CIFARX_")}
    if env.get("CIFARX_DATA_DIR"):
        env["CIFARX_DATA_DIR"] = os.path.abspath(os.path.expanduser(env["CIFARX_DATA_DIR"]))
    return env


@dataclass(frozen=True)
class Pruning:
    """Where a trial reports its curve and asks whether to stop: trial ``trial_id`` of the
    Optuna study ``study_name`` in the journal file ``journal`` (which the worker must reach),
    judged by ``pruner`` (``("median", startup trials, warmup iterations)``). Of a
    configuration's seeds, the first reports (``report``); every seed stops once the
    configuration is judged poor."""

    journal: str
    study_name: str
    trial_id: int
    pruner: tuple
    key: str = "test/acc"  # the curve reported, at each evaluation
    report: bool = True
    last: int = 0  # the trial's last iteration: a trial that got there is not pruned


@dataclass
class Outcome:
    """How a trial ended: ``status`` FINISHED, PRUNED (stopped early by a search's pruner; its
    run is FINISHED, tagged ``cifarx.pruned``) or FAILED (KILLED: interrupted), its run, its
    final metrics and test accuracy curve, and for a failure or a pruning, one line saying
    why."""

    trial: Trial
    status: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, test/acc)
    error: str | None = None


_data: dict[tuple, Any] = {}  # per worker process: trials of one dataset share the loaded images


def _load(plan):
    key = plan.data_key()
    if key not in _data:
        _data.clear()  # one dataset at a time: a worker's memory stays bounded
        _data[key] = plan.load_data()
    plan.check_data(_data[key])
    return _data[key]


def run_trial(trial: Trial) -> Outcome:
    """Train ``trial`` into a child run of the sweep's run (in a worker process). A failure
    on another machine than the sweep's says which (``on node-2: ...``)."""
    os.environ.update(trial.env)
    outcome = _train(trial)
    here = socket.gethostname()
    if outcome.error and outcome.status == "FAILED" and trial.host and here != trial.host:
        outcome.error = f"on {here}: {outcome.error}"
    return outcome


def _train(trial: Trial) -> Outcome:
    from .. import runs
    from ..errors import Diverged, UserError

    tracking = runs.Tracking(trial.tracking_uri, trial.experiment, trial.run_name, trial.parent,
                             {TRIAL_TAG: trial.key, EXECUTOR_TAG: trial.executor},
                             params=axis_params(trial.axes))
    try:
        listeners = [pruning_listener(trial.pruning)] if trial.pruning else []
        if trial.resume:  # from its last checkpoint, in its own run
            job, resume, tracking = runs.prepare_resume(trial.resume, tracking, load=_load)
            done = runs.train_run(job, tracking, listeners, resume=resume)
        else:
            job = runs.prepare_training(trial.config, uri=trial.tracking_uri, load=_load)
            done = runs.train_run(job, tracking, listeners)
    except KeyboardInterrupt:
        return Outcome(trial, "KILLED", error="interrupted")
    except (UserError, Diverged) as exc:
        return Outcome(trial, "FAILED", error=str(exc), run_id=_run_of(trial))
    except Exception as exc:  # a bug in a plugin fails its trial, not the sweep
        detail = traceback.format_exc(limit=-1).strip().splitlines()[-1]
        return Outcome(trial, "FAILED", error=f"{type(exc).__name__}: {exc} ({detail})",
                       run_id=_run_of(trial))
    from ..training.loop import Pruned

    result = done.result
    # Each metric's last value, as the run's stored metrics give it on --resume (val/acc, ...)
    metrics = {key: points[-1][1] for key, points in result.history.items() if points}
    metrics.update({"final/test_acc": result.test_acc, "final/test_loss": result.test_loss,
                    "final/train_seconds": result.seconds,
                    "final/images_per_second": result.images_per_second,
                    **runs.best_metrics(job.plan, result)})
    curve = list(result.history.get("test/acc", []))
    if isinstance(result.stopped, Pruned):  # an early stop is a finished training
        return Outcome(trial, "PRUNED", done.run_id, metrics, curve, error=result.stopped.reason)
    return Outcome(trial, "FINISHED", done.run_id, metrics, curve)


def make_pruner(spec: tuple | None):
    """The Optuna pruner of a spec: ``("median", startup, warmup)``; None: none."""
    import optuna

    if spec is None:
        return optuna.pruners.NopPruner()
    _, startup, warmup = spec
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)


def pruning_listener(pruning: Pruning):
    """A training loop listener that reports ``pruning.key`` to the trial's Optuna study at
    each evaluation and raises :class:`cifarx.training.loop.Pruned` when the pruner says so."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from ..training.loop import Pruned

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(pruning.journal))
    study = optuna.load_study(study_name=pruning.study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(pruning.pruner))

    def listen(points):
        for key, value, step, _ in points:
            if key != pruning.key:
                continue
            if pruning.report:
                storage.set_trial_intermediate_value(pruning.trial_id, step, value)
            # the trial as stored now: the first seed's reports reach the other seeds too
            if (not pruning.last or step < pruning.last) and \
                    study.pruner.prune(study, storage.get_trial(pruning.trial_id)):
                raise Pruned(step, f"pruned at iteration {step} ({key} {value:.4g})")

    return listen


def settle(outcome: Outcome):
    """Make a trial's run say how the trial ended, whoever reported it: a run that a dead
    worker (or node) left RUNNING ends as the outcome says, with its error as the tag
    ``cifarx.error``, unless the run already holds one. Never raises."""
    if outcome.status not in ("FAILED", "KILLED"):
        return
    from ..tracking.lifecycle import ERROR_TAG

    try:
        import mlflow

        client = mlflow.MlflowClient(outcome.trial.tracking_uri)
        outcome.run_id = outcome.run_id or _run_of(outcome.trial)
        if not outcome.run_id:
            return
        run = client.get_run(outcome.run_id)
        if outcome.error and ERROR_TAG not in run.data.tags:
            client.set_tag(outcome.run_id, ERROR_TAG, " ".join(outcome.error.split())[:5000])
        if run.info.status == "RUNNING":
            client.set_terminated(outcome.run_id, outcome.status)
    except Exception:  # the outcome matters more than the run's record of it
        pass


def axis_params(axes: Mapping[str, Any]) -> dict[str, str]:
    """A trial's swept values as the study wrote them, as params ``axis.<key>``
    (``axis.attack-opt.eps = 1/255``) beside the run's own, which hold the values used
    (``attack.eps = 0.00392156862745098``): the user's text to compare trials by in the MLflow
    UI."""
    from ..plugin_api.options import show

    return {f"axis.{key}": ",".join(map(show, value)) if isinstance(value, (list, tuple))
            else show(value) for key, value in axes.items()}


def _run_of(trial: Trial) -> str | None:
    """The run a failed trial opened, if it got that far (found by its tag)."""
    try:
        import mlflow

        found = mlflow.MlflowClient(trial.tracking_uri).search_runs(
            [mlflow.MlflowClient(trial.tracking_uri).get_run(trial.parent).info.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial.key}' and "
                          f"tags.`mlflow.parentRunId` = '{trial.parent}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None
    except Exception:
        return None
