"""A sweep's statistics: per-configuration summaries over seeds, which configurations are
indistinguishable from the best, and the csv/json a sweep writes.

Pure functions of plain data (numpy; scipy is imported where it is used, so ``import
cifarx.stats`` stays cheap).

Data flow: :func:`summarize` turns the finished trials into one row per configuration. Each row
carries, besides its public columns, two private keys (names starting with ``_``):
``_values`` ({metric: tuple of the per-seed values, in trial order}) and ``_axes`` (the axis
names, in order). :func:`rank` and :func:`verdict` read them; :func:`to_csv` and :func:`to_json`
drop every ``_`` key. So ``rank`` needs ``summarize``'s rows (or copies of them), not rows read
back from a csv.
"""

from __future__ import annotations

import csv
import math
import warnings
from typing import Any, Iterable, Mapping

STATS = ("n", "mean", "std", "ci_low", "ci_high")  # per metric, in the csv's column order
RANK_KEYS = ("rank", "p_vs_best", "same_as_best")
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
        trial_metrics = row.get("metrics") or {}
        for m in metrics:
            value = _finite(trial_metrics.get(m))
            if value is not None:
                values[key][m].append(value)
    clash = {"config", "_values", "_axes"} & set(axis_names)
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
        out["_axes"] = tuple(axis_names)
        summary.append(out)
    return summary


def _welch_p(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Welch's two-sided t-test p-value; NaN when either has fewer than 2 values. Two samples
    that are each constant (zero variance): 1.0 when they are equal, else 0.0."""
    if len(a) < 2 or len(b) < 2:
        return NAN
    if len(set(a)) == 1 and len(set(b)) == 1:
        return 1.0 if a[0] == b[0] else 0.0
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p


def _values_of(row: Mapping[str, Any], metric: str) -> tuple[float, ...]:
    if "_values" not in row:
        raise ValueError("rank() and verdict() need summarize()'s rows: they carry the per-seed "
                         "values (the private '_values' key)")
    if metric not in row["_values"]:
        raise ValueError(f"metric {metric!r} was not summarized")
    return row["_values"][metric]


def rank(summary: list[Mapping[str, Any]], metric: str, direction: str = "maximize",
         alpha: float = 0.05, min_n: int = 2) -> list[dict[str, Any]]:
    """The summary rows (copies) sorted best first by ``{metric}_mean``, with ``rank`` (1..),
    ``p_vs_best`` (Welch's two-sided t-test of this configuration's per-seed values against the
    best's; NaN for the best itself and when either has n < 2) and ``same_as_best`` (True for the
    best and when p_vs_best >= alpha, False when below, None when it cannot be tested).

    Only configurations with ``min_n`` or more values are ranked (``rank`` 1..): where two
    seeds were run, one value cannot be told from its noise, so a single lucky seed is never
    "best" (a study of one seed passes ``min_n=1``). Those with fewer follow, unranked
    (``rank`` None), then those with none; ties keep summary order.
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    sign = -1.0 if direction == "maximize" else 1.0
    rows = [dict(row) for row in summary]
    for row in rows:
        _values_of(row, metric)

    def key(item):
        position, row = item
        mean, n = row[f"{metric}_mean"], row[f"{metric}_n"]
        group = 0 if n >= max(min_n, 1) else 1 if math.isfinite(mean) else 2
        return (group, sign * mean if group < 2 else 0.0, position)

    ordered = [row for _, row in sorted(enumerate(rows), key=key)]
    if not ordered:
        return []
    best = _values_of(ordered[0], metric)
    for position, row in enumerate(ordered, 1):
        row["rank"] = position if row[f"{metric}_n"] >= max(min_n, 1) else None
        if position == 1 and row["rank"] is not None:
            row["p_vs_best"], row["same_as_best"] = NAN, True
            continue
        if row["rank"] is None:
            row["p_vs_best"], row["same_as_best"] = NAN, None
            continue
        p = _welch_p(_values_of(row, metric), best)
        row["p_vs_best"] = p
        row["same_as_best"] = None if math.isnan(p) else bool(p >= alpha)
    return ordered


def _name(row: Mapping[str, Any]) -> str:
    axes = row.get("_axes") or ()
    return ", ".join(f"{a}={row.get(a)}" for a in axes) if axes else str(row.get("config"))


def _range(numbers: list[int]) -> str:
    low, high = min(numbers), max(numbers)
    return str(low) if low == high else f"{low} to {high}"


def detectable_difference(variances: list[float], n: int, alpha: float = 0.05,
                          power: float = POWER) -> float:
    """About the smallest difference between two configurations of ``n`` seeds each that a
    two-sided t-test at ``alpha`` detects with probability ``power``, the spread within a
    configuration being the pooled ``variances``: (t_{1-alpha/2} + t_{power}) * s * sqrt(2/n),
    with 2(n-1) degrees of freedom. NaN when n < 2 or there is no variance."""
    if n < 2 or not variances:
        return NAN
    from scipy import stats

    df = 2 * (n - 1)
    s = math.sqrt(sum(variances) / len(variances))
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * s
                 * math.sqrt(2 / n))


def _amount(metric: str, difference: float, means: list[float]) -> str:
    if "acc" in metric.lower() and all(0 <= m <= 1 for m in means):
        return f"{difference * 100:.1f} percentage points"
    return f"{difference:.3g} (in {metric})"


def verdict(ranked: list[Mapping[str, Any]], metric: str, alpha: float = 0.05) -> str:
    """One or two sentences for the console about :func:`rank`'s result: how many of the other
    configurations are indistinguishable from the best, and, when any compared configuration
    has fewer than 5 seeds, that the test has little power, with about the smallest difference it
    would detect (see :func:`detectable_difference`). ``alpha`` should be the one given to rank.
    """
    compared = [row for row in ranked if row.get(f"{metric}_n", 0) >= 1]
    if not compared:
        return f"No configuration has a value of {metric}: nothing to compare."
    best = compared[0]
    if len(compared) == 1:
        return (f"Only one configuration ({_name(best)}) has values of {metric}: "
                "nothing to compare.")
    if best[f"{metric}_n"] < 2:
        ranked_any = best.get("rank") is not None
        return (f"No configuration has 2 values of {metric}, so no difference can be tested"
                + ("" if ranked_any else " and none is ranked") + "; run at least 2 seeds "
                "per configuration (5 or more for a useful test).")
    compared = [row for row in compared if row[f"{metric}_n"] >= 2]
    if len(compared) == 1:
        return (f"Only one configuration ({_name(best)}) has 2 or more values of {metric}: "
                "nothing to compare.")
    others = compared[1:]
    same = sum(1 for row in others if row.get("same_as_best") is True)
    untested = sum(1 for row in others if row.get("same_as_best") is None)
    verb = "is" if same == 1 else "are"
    text = (f"{same} of the {len(others)} other configurations {verb} indistinguishable from the "
            f"best, {_name(best)} ({metric} mean {best[f'{metric}_mean']:.4g}), by Welch's "
            f"t-test at alpha {alpha:g}")
    if untested:
        text += f"; {untested} could not be tested (a single seed)"
    text += "."
    seeds = [int(row[f"{metric}_n"]) for row in compared]
    if min(seeds) < 5:
        testable = [n for n in seeds if n >= 2]
        variances = [row[f"{metric}_std"] ** 2 for row in compared if row[f"{metric}_n"] >= 2]
        difference = detectable_difference(variances, min(testable), alpha)
        text += f" With {_range(seeds)} seeds per configuration"
        if min(seeds) >= 2:
            text += f" ({_range([n - 1 for n in seeds])} degrees of freedom each)"
        text += " the test has little power"
        if math.isfinite(difference) and difference > 0:
            means = [row[f"{metric}_mean"] for row in compared]
            text += (f": differences under ~{_amount(metric, difference, means)} may be missed"
                     f" ({POWER:.0%} power).")
        else:
            text += "."
    return text


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _columns(summary: list[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in summary:
        for k in row:
            if not k.startswith("_") and k not in columns:
                columns.append(k)
    return columns


def to_csv(summary: list[Mapping[str, Any]], path) -> None:
    """One row per configuration: ``config``, one column per axis, then per metric its n, mean,
    std, ci_low, ci_high (and rank, p_vs_best, same_as_best when given rank()'s rows). Values
    unrounded (Python's shortest repr); booleans as ``true``/``false`` (as a study writes
    them); NaN as ``nan``, None as empty; private keys dropped."""
    columns = _columns(summary)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in summary:
            writer.writerow({k: str(v).lower() if isinstance(v, bool) else v
                             for k, v in _public(row).items()})


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
    into ``mlflow.log_dict``. Given rank()'s rows it keeps rank, p_vs_best, same_as_best."""
    rows = [{k: _plain(v) for k, v in _public(row).items()} for row in summary]
    return rows
