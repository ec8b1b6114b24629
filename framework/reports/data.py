"""What a report is made of: finished runs read back from MLflow, grouped into configurations,
and the statistics over their seeds. Everything here but :func:`collect` is a pure function of
the runs, so the same runs always give the same report.

A configuration is a set of runs whose params are equal but for the seed and the machine's
settings (``ENVIRONMENT``); the params that differ between configurations name them, the params
they share are the protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import UserError
from ..studies import compare as cmp


# Params that say where and how a run was computed, not what was trained: a configuration's
# seeds may differ in them. They are listed in the protocol.
ENVIRONMENT = ("seed", "data_dir", "device", "threads", "checkpoint_every")
# Counted by a run from what it was given, never chosen: a configuration is named by its
# options (arch.batchnorm=false), not by their consequence (trainable_parameters=145578).
COUNTED = ("parameters", "trainable_parameters", "val_images", "adv_data_images",
           "adv_data_test_images")
CURVES = ("test/acc", "train/loss")
SWEEP_TAG = "cifarx.sweep"


@dataclass
class RunRecord:
    """One run as the report needs it."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)  # artifact paths under figures/

    @property
    def seed(self) -> int:
        try:
            return int(self.params.get("seed", 0))
        except ValueError:
            return 0


@dataclass
class Group:
    """A configuration: its name, the params that set it apart, its runs."""

    key: str
    label: str
    params: dict[str, str]  # the varying params' values
    runs: list[RunRecord]  # finished
    failed: list[RunRecord] = field(default_factory=list)


@dataclass
class Row:
    """One configuration's line in a metric's table."""

    group: Group
    values: dict[int, float]  # seed -> value
    n: int
    mean: float
    std: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    comparison: cmp.Comparison | None  # None for the control


@dataclass
class MetricTable:
    metric: str
    direction: str
    rows: list[Row]
    control: str  # the control group's key
    control_is_baseline: bool


def configuration_of(record: RunRecord) -> dict[str, str]:
    return {k: v for k, v in record.params.items() if k not in ENVIRONMENT}


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Runs grouped into configurations, in the order of their first run. FAILED and KILLED runs
    join the configuration whose params they share (a configuration may have only those)."""
    import json

    keys: dict[str, list[RunRecord]] = {}
    for record in records:
        keys.setdefault(json.dumps(configuration_of(record), sort_keys=True), []).append(record)
    configs = {key: json.loads(key) for key in keys}
    names = sorted({name for c in configs.values() for name in c})
    varying = [n for n in names if len({c.get(n) for c in configs.values()}) > 1]
    # A param that only follows one other (aug.flip.p is set where aug has flip, the momentum
    # where the optimizer takes one) names nothing new: leave it out of the labels, counts
    # first. The one it follows stays, so the configurations stay told apart; a set that
    # merely told them apart could drop the optimizer for its lr.
    def follows(name: str, other: str) -> bool:
        pairs = {(c.get(other), c.get(name)) for c in configs.values()}
        return len(pairs) == len({other_value for other_value, _ in pairs})

    for name in sorted(varying, key=lambda n: (n not in COUNTED, -n.count("."))):
        rest = [n for n in varying if n != name]
        if any(follows(name, other) for other in rest):
            varying = rest
    groups = []
    for key, runs in keys.items():
        params = {n: configs[key].get(n, "") for n in varying}
        label = " ".join(f"{n}={v}" for n, v in params.items()) or "all runs"
        finished = sorted((r for r in runs if r.status == "FINISHED"), key=lambda r: r.seed)
        failed = [r for r in runs if r.status != "FINISHED"]
        groups.append(Group(key, label, params, finished, failed))
    return groups


def param_of(key: str) -> str:
    """A study's key (``batch-size``, ``arch-opt.width``, ``aug-opt.crop.pad``) as the param a
    run logs (``batch_size``, ``arch.width``, ``aug.crop.pad``); a param name stays as it is."""
    head, dot, rest = key.partition(".")
    if head.endswith("-opt"):
        head = head[:-len("-opt")]
    return head.replace("-", "_") + dot + rest


def find_baseline(groups: list[Group], baseline: Mapping[str, Any]) -> Group:
    """The one configuration whose params match ``baseline`` (name -> value as written; a
    study's keys or the params' names)."""
    def matches(group: Group) -> bool:
        params = {**configuration_of(group.runs[0] if group.runs else group.failed[0])}
        return all(param_of(name) in params and cmp.same_value(value, params[param_of(name)])
                   for name, value in baseline.items())

    found = [g for g in groups if matches(g)]
    written = ", ".join(f"{k}={v}" for k, v in baseline.items())
    if len(found) == 1:
        return found[0]
    names = "; ".join(g.label for g in groups)
    if not found:
        raise UserError(f"the baseline {written} matches no configuration; the configurations "
                        f"are: {names}")
    raise UserError(f"the baseline {written} matches {len(found)} configurations "
                    f"({'; '.join(g.label for g in found)}): name more params to pick one")


def metrics_of(groups: list[Group], primary: str) -> list[str]:
    """The summary metrics every finished run has (final/*, best/* and the primary), primary
    first. A finished run without the primary metric is bad input (runs of another kind)."""
    finished = [r for g in groups for r in g.runs]
    lacking = [r for r in finished if primary not in r.metrics]
    if lacking:
        ids = ", ".join(r.run_id[:8] for r in lacking[:5])
        raise UserError(f"runs {ids} have no metric {primary!r} while others do: a report "
                        "compares runs of one kind (choose the runs, or --metric)")
    shared = set.intersection(*(set(r.metrics) for r in finished))
    chosen = sorted(m for m in shared if m.startswith(("final/", "best/")) and m != primary)
    return [primary, *chosen]


def direction_of(metric: str, given: str | None = None) -> str:
    if given:
        return given
    low = metric.lower()
    return "minimize" if any(w in low for w in ("loss", "seconds", "error")) else "maximize"


def table(groups: list[Group], metric: str, direction: str, baseline: Group | None,
          alpha: float, correction: str, confidence: float) -> MetricTable:
    """One metric over the configurations: per-seed values, mean, std, the Student-t and
    bootstrap intervals, and each configuration against the control (the baseline, else the
    best configuration by mean among those with n >= 2)."""
    from ..studies.stats import _describe  # the same Student-t summary a sweep prints

    values = {g.key: {r.seed: r.metrics[metric] for r in g.runs
                      if metric in r.metrics and math.isfinite(r.metrics[metric])}
              for g in groups}
    sign = 1 if direction == "maximize" else -1
    control = baseline
    if control is None:
        ranked = [g for g in groups if len(values[g.key]) >= 2] or \
                 [g for g in groups if values[g.key]]
        control = max(ranked, key=lambda g: sign * sum(values[g.key].values())
                      / len(values[g.key]))
    comparisons = {c.config: c for c in cmp.compare(
        {g.key: values[g.key] for g in groups if values[g.key] or g is control}, control.key,
        alpha, correction, confidence)} if values[control.key] else {}
    rows = []
    for g in groups:
        vals = values[g.key]
        d = _describe(list(vals.values()), confidence)
        low, high = cmp.bootstrap_interval(list(vals.values()), confidence)
        rows.append(Row(g, vals, d["n"], d["mean"], d["std"], d["ci_low"], d["ci_high"], low,
                        high, comparisons.get(g.key)))
    order = sorted(rows, key=lambda r: (r.group is not control, r.n == 0,
                                         -sign * r.mean if r.n else 0))
    return MetricTable(metric, direction, order, control.key, baseline is not None)
