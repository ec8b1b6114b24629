"""A sweep's summary over seeds: ``sweep.json``, ``sweep.csv``, the ranked table and the
figures, logged to the sweep's run, and how the MLflow UI shows its trials.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..plugin_api.options import show
from ..tracking.common import runs_view, ui_page
from . import stats
from .configurations import config_key
from .study import Study, axes_of
from .sweep_plan import SweepPlan, SweepResult, param_of, run_namer, trial_name
from .trials import Outcome

FAILED_TAG = "cifarx.failed_trials"


def trials_view(study: Study, run_id: str, name: str, longest: int = 30) -> str:
    """The runs table of a sweep's trials (a saved view, see
    :func:`cifarx.tracking.common.runs_view`): its trials alone, best first, with the axes, the seed
    and the metric as columns, the Run Name column wide enough for ``longest`` characters (within
    190 to 480 pixels)."""
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


def baseline_of(study: Study, summary: list[dict[str, Any]]) -> str | None:
    """The key of the configuration the study names as its baseline (``baseline = {aug =
    "normalize"}``); None without one, or when it has no finished trial (the best is the
    control then, and the verdict says against what)."""
    if not study.baseline:
        return None
    from .compare import same_value

    found = [row["config"] for row in summary
             if all(same_value(value, show(row.get(key))) for key, value in study.baseline.items())]
    return found[0] if len(found) == 1 else None


def summarize(sweep: SweepPlan, run, outcomes: list[Outcome], earlier: dict,
              seconds: float, search: dict[str, Any] | None = None) -> SweepResult:
    """The statistics over seeds, logged with the sweep's run. Pruned trials are left out of
    the statistics (listed as ``pruned``; their curves are drawn)."""
    from ..figures import sweep_axes, sweep_curves

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
    ranked = stats.rank(summary, study.metric, study.direction, min_n=min(2, len(study.seeds)),
                        control=baseline_of(study, summary)) if summary else []
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
                  "ranked": [{k: r[k] for k in ("config", "rank", *stats.COMPARED)}
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
