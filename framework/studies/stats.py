"""A sweep's statistics: per-configuration summaries over seeds, each configuration against
the control (the study's baseline, else the best; the tests are :mod:`cifarx.studies.compare`'s,
as in ``cifarx report``), and the csv/json a sweep writes.

Pure functions of plain data (numpy; scipy is imported where it is used, so ``import
cifarx.studies.stats`` stays cheap).

Data flow: :func:`summarize` turns the finished trials into one row per configuration. Each row
carries, besides its public columns, private keys (names starting with ``_``): ``_values``
({metric: tuple of the per-seed values, in trial order}), ``_seeds`` (the seeds of those values)
and ``_axes`` (the axis names, in order). :func:`rank` and :func:`verdict` read them;
:func:`to_csv` and :func:`to_json` drop every ``_`` key. So ``rank`` needs ``summarize``'s rows
(or copies of them), not rows read back from a csv.
"""

from __future__ import annotations

import csv
import math
from typing import Any, Iterable, Mapping

STATS = ("n", "mean", "std", "ci_low", "ci_high")  # per metric, in the csv's column order
POWER = 0.8  # the power at which verdict() quotes the smallest detectable difference
NAN = float("nan")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _describe(values: list[float], confidence: float) -> dict[str, float]:
    """n, mean, sample std (ddof=1) and the Student-t interval of the mean."""
    import numpy as np

    n = len(values)
    if n == 0:
        return dict(n=0, mean=NAN, std=NAN, ci_low=NAN, ci_high=NAN)
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if n < 2:
        return dict(n=1, mean=mean, std=NAN, ci_low=NAN, ci_high=NAN)
    from scipy import stats

    std = float(array.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci_low=mean - half, ci_high=mean + half)


def summarize(rows: Iterable[Mapping[str, Any]], metrics: Iterable[str],
              confidence: float = 0.95) -> list[dict[str, Any]]:
    """One dict per configuration, in first-seen order.

    ``rows``: one per finished trial, ``{"config": key, "axes": {axis: value}, "seed": int,
    "metrics": {metric: float}}``. Each summary row has ``config``, each axis as its own key
    (the union of the trials' axes, first-seen order; None where a configuration lacks one), then
    for each metric ``m``: ``m_n``, ``m_mean``, ``m_std`` (ddof=1), ``m_ci_low``, ``m_ci_high``
    (Student-t interval of the mean at ``confidence``). A metric missing, None or non-finite in a
    trial is skipped for that trial; std and the interval are NaN when n < 2, the mean too when
    n == 0. Plus the private ``_values`` and ``_axes`` (see the module's docstring).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    metrics = list(metrics)
    order: list[str] = []
    axes: dict[str, Any] = {}  # per config
    values: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, dict[str, list[int]]] = {}
    axis_names: list[str] = []
    for row in rows:
        key = row["config"]
        trial_axes = dict(row.get("axes") or {})
        for name in trial_axes:
            if name not in axis_names:
                axis_names.append(name)
        if key not in values:
            order.append(key)
            axes[key] = trial_axes
            values[key] = {m: [] for m in metrics}
            seeds[key] = {m: [] for m in metrics}
        trial_metrics = row.get("metrics") or {}
        for m in metrics:
            value = _finite(trial_metrics.get(m))
            if value is not None:
                values[key][m].append(value)
                seeds[key][m].append(row.get("seed", len(seeds[key][m])))
    clash = {"config", "_values", "_seeds", "_axes"} & set(axis_names)
    if clash:
        raise ValueError(f"an axis may not be named {sorted(clash)[0]!r}")
    summary = []
    for key in order:
        out: dict[str, Any] = {"config": key}
        for name in axis_names:
            out[name] = axes[key].get(name)
        for m in metrics:
            for stat, value in _describe(values[key][m], confidence).items():
                out[f"{m}_{stat}"] = value
        out["_values"] = {m: tuple(values[key][m]) for m in metrics}
        out["_seeds"] = {m: tuple(seeds[key][m]) for m in metrics}
        out["_axes"] = tuple(axis_names)
        summary.append(out)
    return summary


def _values_of(row: Mapping[str, Any], metric: str) -> tuple[float, ...]:
    if "_values" not in row:
        raise ValueError("rank() and verdict() need summarize()'s rows: they carry the per-seed "
                         "values (the private '_values' key)")
    if metric not in row["_values"]:
        raise ValueError(f"metric {metric!r} was not summarized")
    return row["_values"][metric]


COMPARED = ("vs", "test", "difference", "diff_ci_low", "diff_ci_high", "p", "p_adjusted",
            "verdict")  # the columns rank() adds after ``rank``


def rank(summary: list[Mapping[str, Any]], metric: str, direction: str = "maximize",
         alpha: float = 0.05, min_n: int = 2, control: str | None = None,
         correction: str = "holm") -> list[dict[str, Any]]:
    """The summary rows (copies) sorted best first by ``{metric}_mean``, with ``rank`` (1..)
    and each configuration against the control: ``control`` (a configuration's key: the
    study's baseline), else the best. The test is :func:`cifarx.studies.compare.compare`'s,
    the one ``cifarx report`` makes: paired when both ran the same seeds, else Welch's, with
    ``correction`` over the comparisons; so the sweep's table, its csv and json, and the
    report agree. Columns: ``vs`` (the control's key), ``test``, ``difference`` (mean minus
    the control's) with its interval ``diff_ci_low``/``diff_ci_high``, ``p``, ``p_adjusted``
    and ``verdict``: ``control``, ``better``, ``worse``, ``indistinguishable`` (p_adjusted >=
    alpha) or ``untested`` (a side with fewer than 2 values).

    Only configurations with ``min_n`` or more values are ranked (``rank`` 1..): where two
    seeds were run, one value cannot be told from its noise, so a single lucky seed is never
    "best" (a study of one seed passes ``min_n=1``). Those with fewer follow, unranked
    (``rank`` None, ``verdict`` untested), then those with none; ties keep summary order.
    """
    from .compare import compare

    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    sign = -1.0 if direction == "maximize" else 1.0
    rows = [dict(row) for row in summary]
    for row in rows:
        _values_of(row, metric)
    if control is not None and control not in {row["config"] for row in rows}:
        raise ValueError(f"the control {control!r} is not one of the configurations")

    def key(item):
        position, row = item
        mean, n = row[f"{metric}_mean"], row[f"{metric}_n"]
        group = 0 if n >= max(min_n, 1) else 1 if math.isfinite(mean) else 2
        return (group, sign * mean if group < 2 else 0.0, position)

    ordered = [row for _, row in sorted(enumerate(rows), key=key)]
    for position, row in enumerate(ordered, 1):
        row["rank"] = position if row[f"{metric}_n"] >= max(min_n, 1) else None
        row.update(dict.fromkeys(COMPARED, None))
        row.update(difference=NAN, diff_ci_low=NAN, diff_ci_high=NAN, p=NAN, p_adjusted=NAN,
                   verdict="untested")
    if not ordered:
        return []
    chosen = control or (ordered[0]["config"] if ordered[0]["rank"] is not None else None)
    if chosen is None:
        return ordered
    by_seed = {row["config"]: dict(zip(row["_seeds"][metric], _values_of(row, metric)))
               for row in ordered if row["rank"] is not None or row["config"] == chosen}
    found = {c.config: c for c in compare(by_seed, chosen, alpha, correction)}
    for row in ordered:
        row["vs"] = chosen
        if row["config"] == chosen:
            row["verdict"], row["_named"] = "control", control is not None
            continue
        c = found.get(row["config"])
        if c is None or not c.test:
            continue
        better = (c.difference > 0) == (direction == "maximize")
        row.update(test=c.test, difference=c.difference, diff_ci_low=c.ci_low,
                   diff_ci_high=c.ci_high, p=c.p, p_adjusted=c.p_adjusted, _detectable=c.detectable,
                   verdict=("better" if better else "worse") if c.significant
                   else "indistinguishable")
    return ordered


def _name(row: Mapping[str, Any]) -> str:
    axes = row.get("_axes") or ()
    # an axis a configuration leaves unset (None) runs at its default: not part of its name
    return (", ".join(f"{a}={row.get(a)}" for a in axes if row.get(a) is not None) if axes
            else str(row.get("config")))


def _amount(metric: str, difference: float, means: list[float]) -> str:
    if "acc" in metric.lower() and all(0 <= m <= 1 for m in means):
        return f"{difference * 100:.1f} percentage points"
    return f"{difference:.3g} (in {metric})"


def verdict(ranked: list[Mapping[str, Any]], metric: str, alpha: float = 0.05,
            correction: str = "holm") -> str:
    """One or two sentences for the console about :func:`rank`'s result: how the other
    configurations compare with the control (better, worse, indistinguishable), by which
    test, and when some were indistinguishable, about the smallest difference the seeds could
    have detected (80% power at the corrected alpha). ``alpha`` and ``correction`` should be
    those given to rank."""
    compared = [row for row in ranked if row.get(f"{metric}_n", 0) >= 1]
    if not compared:
        return f"No configuration has a value of {metric}: nothing to compare."
    control = next((row for row in ranked if row.get("verdict") == "control"), None)
    if control is None:
        ranked_any = any(row.get("rank") is not None for row in ranked)
        return (f"No configuration has 2 values of {metric}, so no difference can be tested"
                + ("" if ranked_any else " and none is ranked") + "; run at least 2 seeds "
                "per configuration (5 or more for a useful test).")
    others = [row for row in compared if row is not control]
    if not others:
        return f"Only one configuration ({_name(control)}) has values of {metric}: nothing " \
               "to compare."
    counts = {v: sum(1 for row in others if row["verdict"] == v)
              for v in ("better", "worse", "indistinguishable", "untested")}
    role = "the baseline" if control.get("_named") else "the best"
    tests = sorted({row["test"] for row in others if row.get("test")})
    how = " and ".join({"paired": "paired t-tests (the same seeds)",
                        "welch": "Welch's t-tests"}[t] for t in tests)
    text = (f"Against {role}, {_name(control)} ({metric} mean {control[f'{metric}_mean']:.4g}): "
            + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
            + (f" ({how}, {correction} correction, alpha {alpha:g})" if how else "") + ".")
    missed = [row["_detectable"] for row in others if row["verdict"] == "indistinguishable"
              and math.isfinite(row.get("_detectable", NAN))]
    if missed:
        means = [row[f"{metric}_mean"] for row in compared]
        share = "acc" in metric.lower() and all(0 <= m <= 1 for m in means)
        if share and max(missed) >= 1:  # more than the whole scale: nothing is detectable
            text += (f" So few seeds cannot detect any difference at {POWER:.0%} power: run "
                     "more.")
        else:
            least, most = _amount(metric, min(missed), means), _amount(metric, max(missed), means)
            text += (f" These seeds could miss a true difference under about {most}"
                     + (f" ({least} for the steadiest configuration)" if least != most else "")
                     + f" ({POWER:.0%} power).")
    return text


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _columns(summary: list[Mapping[str, Any]]) -> list[str]:
    """The axes first (what a reader looks for), then the figures, the digest last."""
    columns: list[str] = []
    for row in summary:
        for k in row:
            if not k.startswith("_") and k not in columns:
                columns.append(k)
    axes = list(dict.fromkeys(a for row in summary for a in row.get("_axes", ()) if a in columns))
    rest = [c for c in columns if c not in axes and c != "config"]
    return axes + rest + (["config"] if "config" in columns else [])


def short(value: float) -> float:
    """A statistic at the precision of the float32 measurements it summarizes: the shortest
    decimal that reads back as the same float32 (0.4427, not 0.44269999861717224). A value
    float32 cannot hold (a p-value of 1e-50, inf, NaN) stays as it is."""
    import numpy as np

    single = np.float32(value)
    if not math.isfinite(value) or not np.isfinite(single) or \
            abs(value) < np.finfo(np.float32).tiny:
        return value
    return float(str(single))  # numpy prints a float32 as its shortest round-trip decimal


def _shortened(row: Mapping[str, Any], columns: list[str]) -> dict[str, Any]:
    """The public columns in ``columns``' order, the statistics :func:`short` (an axis keeps
    its value as set)."""
    axes = set(row.get("_axes", ()))
    public = _public(row)
    return {k: short(public[k]) if isinstance(public[k], float) and k not in axes
            else public[k] for k in columns if k in public}


def to_csv(summary: list[Mapping[str, Any]], path) -> None:
    """One row per configuration: one column per axis, then per metric its n, mean, std,
    ci_low, ci_high (and rank and the comparison with the control, :data:`COMPARED`, when
    given rank()'s rows), and the
    configuration's digest, ``config``. Numbers at float32's precision (:func:`short`: the
    accuracies are float32); booleans as ``true``/``false`` (as a study writes them); NaN as
    ``nan``, None as empty; private keys dropped."""
    columns = _columns(summary)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in summary:
            writer.writerow({k: str(v).lower() if isinstance(v, bool) else v
                             for k, v in _shortened(row, columns).items()})


def _plain(value: Any) -> Any:
    if isinstance(value, float) or type(value).__module__ == "numpy":
        try:
            number = value.item() if hasattr(value, "item") else value
        except (TypeError, ValueError):
            return str(value)
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def to_json(summary: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The summary as JSON-ready data (not a string): a list with one dict per configuration,
    the csv's keys in the same order, NaN/inf as None, numpy scalars as Python numbers, other
    objects as str, private keys dropped. ``json.dumps(to_json(summary), allow_nan=False)`` succeeds; it can go straight
    into ``mlflow.log_dict``. Given rank()'s rows it keeps rank and :data:`COMPARED`."""
    columns = _columns(summary)
    return [{k: _plain(v) for k, v in _shortened(row, columns).items()} for row in summary]
