"""Planning a sweep: every trial (and a tpe search's random start) planned and checked
before the sweep's run opens; how many trials its executor runs at once; what a sweep
returns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from ..errors import UserError
from ..plugin_api.options import OptionError, brief, flag_label, reword, show
from ..plugin_api.registry import Catalog, catalog as default_catalog
from ..tracking.common import tracking_uri as resolve_uri
from ..training.config import OPTION_FLAGS, plan as make_plan, resolve_plugin_options
from .configurations import config_key, configurations, digest
from .study import OPTION_KEYS, Configuration, Study, field_name, pruner_warmup, raw_of
from .trials import Outcome, Trial, origin, portable

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
    if study.baseline and study.search == "grid":
        check_baseline(study.baseline, points)
    for point in (checked + points if search else points):
        try:
            make_plan(point.config, catalog)
        except UserError as exc:
            where = ", ".join(f"{k}={show(v)}" for k, v in point.axes.items())
            raise UserError(f"study{' (' + where + ')' if where else ''}: {exc}") from None
    uri = resolve_uri(uri)
    run_name_of = run_namer(study)
    where = origin()
    # the key before the data folder is made absolute: a sweep resumes from another folder
    trials = [Trial(key=config_key(config), number=i, config=portable(config), axes=point.axes,
                    tracking_uri=uri, experiment=study.experiment, parent="",
                    executor=found.name, run_name=run_name_of(point.axes, config.seed), **where)
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


def check_baseline(baseline: Mapping[str, Any], points: list[Configuration]):
    """The baseline names one configuration of the grid, or the sweep would run and then fall
    back to the best: one line before any run opens."""
    from .compare import same_value

    found = [p for p in points if all(
        k in p.axes and same_value(v, show(p.axes[k])) for k, v in baseline.items())]
    if len(found) != 1:
        named = ", ".join(f"{k} = {show(v)}" for k, v in baseline.items())
        listed = "; ".join(", ".join(f"{k}={show(v)}" for k, v in p.axes.items())
                           for p in points[:8]) + ("; ..." if len(points) > 8 else "")
        raise UserError(f"baseline {named} matches {len(found)} configurations, not one; "
                        f"the configurations: {listed}")


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
    from ..plugins.executors import host_port, is_remote

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


def param_of(axis: str) -> str:
    """The MLflow param that holds a study key's value: ``lr`` -> ``lr``, ``eval-every`` ->
    ``eval_every``, ``arch-opt.activation`` -> ``arch.activation``."""
    head, _, rest = axis.partition(".")
    if head in OPTION_KEYS:
        return f"{head.removesuffix('-opt')}.{rest}"
    name = field_name(axis, "study")
    return "probe" if name == "probes" else name
