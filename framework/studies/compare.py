"""Configurations compared with a control over seeds: the tests a report and a sweep quote.

Each configuration's per-seed values are tested against the control's (a baseline the study
names, or else the best configuration): a paired t-test when both ran the same seeds (seed
``s`` of each shares its initialisation and batch order, so pairing removes that noise), else
Welch's t-test. The p-values are corrected for the number of comparisons (Holm by default,
which controls the family-wise error like Bonferroni but rejects more), and each comparison
carries the difference of means with its interval, a standardized effect size (Hedges' g, or
d_z when paired) and the smallest difference the seeds could have detected at 80% power.

Pure functions of plain numbers; scipy does the distributions (imported where used).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

CORRECTIONS = ("holm", "bonferroni", "none")
POWER = 0.8
NAN = float("nan")


@dataclass(frozen=True)
class Comparison:
    """One configuration against the control, for one metric."""

    config: str
    control: str
    test: str  # "paired" or "welch"; "" when it could not be tested (a side with n < 2)
    n: int
    n_control: int
    difference: float  # mean(config) - mean(control)
    ci_low: float  # interval of the difference at the report's confidence
    ci_high: float
    effect_size: float  # Hedges' g (welch) or d_z (paired)
    p: float  # two-sided, uncorrected
    p_adjusted: float  # after the correction
    significant: bool | None  # p_adjusted < alpha; None when untested
    detectable: float  # smallest |difference| detected with POWER at the corrected alpha

    def as_dict(self) -> dict:
        return asdict(self)


def same_value(written: Any, logged: str) -> bool:
    """A baseline's value as the user wrote it against a param as logged: equal as text, as
    numbers, or as comma lists in any order (cifarx logs ``--aug`` in pipeline order)."""
    text = str(written).lower() if isinstance(written, bool) else str(written)
    if text == logged:
        return True
    try:
        return math.isclose(float(text), float(logged), rel_tol=1e-6)
    except ValueError:
        pass
    return sorted(text.split(",")) == sorted(logged.split(","))


def paired_seeds(a: Mapping[int, float], b: Mapping[int, float]) -> bool:
    """Whether two configurations ran exactly the same seeds (at least two)."""
    return len(a) >= 2 and set(a) == set(b)


def adjust(pvalues: list[float], method: str = "holm") -> list[float]:
    """p-values corrected for multiple comparisons; NaN entries stay NaN and are not counted.

    Holm's step-down: sort the m p-values, multiply the k-th smallest by (m - k + 1), carry
    the running maximum, cap at 1. Bonferroni: multiply each by m, cap at 1."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(tested)
    out = list(pvalues)
    if method == "none" or m == 0:
        return out
    if method == "bonferroni":
        for i in tested:
            out[i] = min(1.0, pvalues[i] * m)
        return out
    running = 0.0
    for k, i in enumerate(sorted(tested, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, pvalues[i] * (m - k)))
        out[i] = running
    return out


def _rounding_is_zero(difference: float, *samples: Mapping[int, float]) -> float:
    """0 for a difference of means that is only rounding (equal means summed in another
    order), which would otherwise be reported as a difference of -3.7e-17."""
    scale = max(abs(v) for sample in samples for v in sample.values())
    return 0.0 if abs(difference) <= 1e-12 * scale else difference


def _two(values: Mapping[int, float], control: Mapping[int, float], confidence: float):
    """(test, difference, ci_low, ci_high, effect size, p, standard error, df)."""
    import numpy as np
    from scipy import stats

    if paired_seeds(values, control):
        seeds = sorted(values)
        d = np.array([values[s] - control[s] for s in seeds])
        n = len(d)
        sd = float(d.std(ddof=1))
        mean = _rounding_is_zero(float(d.mean()), values, control)
        if sd == 0:  # every seed moved by the same amount: no spread to test against
            effect = 0.0 if mean == 0 else math.copysign(math.inf, mean)
            return "paired", mean, mean, mean, effect, (1.0 if mean == 0 else 0.0), 0.0, n - 1
        result = stats.ttest_rel([values[s] for s in seeds], [control[s] for s in seeds])
        low, high = result.confidence_interval(confidence)
        return ("paired", mean, float(low), float(high), mean / sd, float(result.pvalue),
                sd / math.sqrt(n), n - 1)
    a = np.array(list(values.values()), dtype=float)
    b = np.array(list(control.values()), dtype=float)
    n1, n2 = len(a), len(b)
    v1, v2 = float(a.var(ddof=1)), float(b.var(ddof=1))
    mean = _rounding_is_zero(float(a.mean() - b.mean()), values, control)
    se = math.sqrt(v1 / n1 + v2 / n2)
    pooled = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    g = NAN if pooled == 0 else mean / pooled * (1 - 3 / (4 * (n1 + n2) - 9))  # Hedges' correction
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
        return "welch", mean, mean, mean, g, p, 0.0, n1 + n2 - 2
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(confidence)
    df = (v1 / n1 + v2 / n2) ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    return "welch", mean, float(low), float(high), g, float(result.pvalue), se, df


def detectable(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """About the smallest true difference a two-sided t-test at ``alpha`` detects with
    probability ``power``, given the standard error of the difference: (t_{1-alpha/2} +
    t_{power}) * se."""
    from scipy import stats

    if not (df > 0 and math.isfinite(se)):
        return NAN
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)


def compare(values: Mapping[str, Mapping[int, float]], control: str, alpha: float = 0.05,
            correction: str = "holm", confidence: float = 0.95) -> list[Comparison]:
    """Every configuration of ``values`` ({config: {seed: value}}) but ``control``, tested
    against it, in the order given. The correction counts the comparisons that could be
    tested (both sides with n >= 2); the detectable difference uses the corrected alpha
    (alpha / m, Holm's first and strictest step), so it is what these seeds can promise."""
    if control not in values:
        raise ValueError(f"the control {control!r} is not one of the configurations")
    if not 0 < alpha < 1 or not 0 < confidence < 1:
        raise ValueError("alpha and confidence must be in (0, 1)")
    base = values[control]
    rows = []
    for config, vals in values.items():
        if config == control:
            continue
        if len(vals) < 2 or len(base) < 2:
            rows.append([config, "", len(vals), NAN, NAN, NAN, NAN, NAN, NAN, NAN])
            continue
        test, *rest = _two(vals, base, confidence)
        rows.append([config, test, len(vals), *rest])
    tested = sum(1 for r in rows if r[1])
    corrected_alpha = alpha / tested if tested and correction != "none" else alpha
    adjusted = adjust([r[7] for r in rows], correction)
    out = []
    for row, p_adj in zip(rows, adjusted):
        config, test, n, diff, low, high, effect, p, se, df = row
        out.append(Comparison(
            config=config, control=control, test=test, n=n, n_control=len(base),
            difference=diff, ci_low=low, ci_high=high, effect_size=effect, p=p,
            p_adjusted=p_adj, significant=None if not test else bool(p_adj < alpha),
            detectable=detectable(se, df, corrected_alpha) if test else NAN))
    return out


def bootstrap_interval(values: list[float], confidence: float = 0.95,
                       resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean (seeded: the same values give the same
    interval). With few seeds it is narrower than Student's t: it cannot know the tails."""
    import numpy as np
    from scipy import stats

    if len(values) < 2 or len(set(values)) == 1:
        v = values[0] if values else NAN
        return (v, v) if len(values) >= 2 else (NAN, NAN)
    result = stats.bootstrap((np.asarray(values, dtype=float),), np.mean,
                             confidence_level=confidence, n_resamples=resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
