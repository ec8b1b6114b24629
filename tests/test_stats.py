"""cifarx.stats against hand computations on small made-up numbers; the sweep figures build."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import special, stats as sps

from cifarx import figures
from cifarx.studies import stats

ACC = {"a": [0.80, 0.82, 0.84], "b": [0.78, 0.80, 0.82], "c": [0.70, 0.71, 0.72]}
LOSS = {"a": [0.5, 0.4, 0.6], "b": [0.3, 0.5, None], "c": [0.9, float("nan"), 0.7]}
AXES = {"a": {"lr": 0.1, "aug": "none"}, "b": {"lr": 0.01, "aug": "none"},
        "c": {"lr": 0.001, "aug": "flip"}}


def trials(acc=ACC, loss=LOSS, axes=AXES):
    rows = []
    for key in acc:
        for seed, (a, l) in enumerate(zip(acc[key], loss[key])):
            metrics = {"test/acc": a}
            if l is not None:  # b's third trial has no loss at all
                metrics["test/loss"] = l
            rows.append({"config": key, "axes": axes[key], "seed": seed, "metrics": metrics})
    return rows


def by_config(rows):
    return {r["config"]: r for r in rows}


def hand_mean_std(values):
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def test_summarize_matches_hand_computation():
    summary = stats.summarize(trials(), ["test/acc", "test/loss"])
    assert [r["config"] for r in summary] == ["a", "b", "c"]  # first-seen order
    a = summary[0]
    assert a["lr"] == 0.1 and a["aug"] == "none"
    assert a["test/acc_n"] == 3
    mean, std = hand_mean_std(ACC["a"])
    assert a["test/acc_mean"] == pytest.approx(0.82) == pytest.approx(mean)
    assert a["test/acc_std"] == pytest.approx(0.02) == pytest.approx(std)
    # t quantile with 2 degrees of freedom, closed form: (2p-1)/sqrt(2p(1-p)), p = 0.975
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t == pytest.approx(sps.t.ppf(0.975, 2))
    half = t * 0.02 / math.sqrt(3)
    assert a["test/acc_ci_low"] == pytest.approx(0.82 - half)
    assert a["test/acc_ci_high"] == pytest.approx(0.82 + half)
    # confidence changes the interval only
    narrow = stats.summarize(trials(), ["test/acc"], confidence=0.5)[0]
    assert narrow["test/acc_ci_high"] - narrow["test/acc_mean"] == pytest.approx(
        sps.t.ppf(0.75, 2) * 0.02 / math.sqrt(3))
    assert narrow["test/acc_mean"] == a["test/acc_mean"]


def test_missing_and_non_finite_metrics_are_skipped_and_n1_is_nan():
    summary = by_config(stats.summarize(trials(), ["test/loss", "test/never"]))
    b, c = summary["b"], summary["c"]
    assert b["test/loss_n"] == 2 and b["test/loss_mean"] == pytest.approx(0.4)
    assert b["test/loss_std"] == pytest.approx(math.sqrt(0.02))
    assert c["test/loss_n"] == 2 and c["test/loss_mean"] == pytest.approx(0.8)  # NaN skipped
    assert summary["a"]["test/never_n"] == 0
    assert all(math.isnan(summary["a"][f"test/never_{s}"])
               for s in ("mean", "std", "ci_low", "ci_high"))
    one = stats.summarize([{"config": "x", "axes": {}, "seed": 0, "metrics": {"m": 0.5}}],
                          ["m"])[0]
    assert one["m_n"] == 1 and one["m_mean"] == 0.5
    assert math.isnan(one["m_std"]) and math.isnan(one["m_ci_low"]) \
        and math.isnan(one["m_ci_high"])


def welch_by_hand(x, y):
    """Welch's t and Welch-Satterthwaite df; the two-sided p through the incomplete beta
    function: P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)."""
    (mx, sx), (my, sy) = hand_mean_std(x), hand_mean_std(y)
    vx, vy = sx ** 2 / len(x), sy ** 2 / len(y)
    t = (mx - my) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return t, df, float(special.betainc(df / 2, 0.5, df / (df + t * t)))


def test_rank_tests_each_configuration_against_the_best_as_the_report_does():
    """The same seeds: paired t-tests against the best, Holm-corrected (scipy recomputes
    them); the sweep's table, csv and json agree with `cifarx report` (issue 19)."""
    summary = stats.summarize(trials(), ["test/acc", "test/loss"])
    ranked = stats.rank(summary, "test/acc")
    assert [r["config"] for r in ranked] == ["a", "b", "c"]
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    a, b, c = ranked
    assert (a["verdict"], a["vs"]) == ("control", "a") and math.isnan(a["p"])
    raw = [sps.ttest_rel(ACC[k], ACC["a"]).pvalue for k in ("b", "c")]
    holm = sorted(raw)
    adjusted = {p: min(1, max(holm[0] * 2, holm[1] * 1) if p == holm[1] else holm[0] * 2)
                for p in raw}
    for row, p in zip((b, c), raw):
        assert row["test"] == "paired" and row["p"] == pytest.approx(p, rel=1e-9)
        assert row["p_adjusted"] == pytest.approx(adjusted[p], rel=1e-9)
        key = row["config"]
        assert row["difference"] == pytest.approx(sum(ACC[key]) / 3 - sum(ACC["a"]) / 3)
        low, high = sps.ttest_rel(ACC[key], ACC["a"]).confidence_interval(0.95)
        assert (row["diff_ci_low"], row["diff_ci_high"]) == (pytest.approx(low),
                                                             pytest.approx(high))
        assert row["verdict"] == ("worse" if row["p_adjusted"] < 0.05 else "indistinguishable")
    assert stats.rank(summary, "test/acc", alpha=1e-9)[2]["verdict"] == "indistinguishable"
    assert "rank" not in summary[0]  # the summary itself is not modified


def test_rank_uses_welch_where_the_seeds_differ_and_a_named_control():
    rows = trials()
    rows = [dict(r, seed=r["seed"] + 10) if r["config"] == "c" else r for r in rows]
    ranked = stats.rank(stats.summarize(rows, ["test/acc"]), "test/acc")
    c = by_config(ranked)["c"]
    t, df, p = welch_by_hand(ACC["c"], ACC["a"])
    assert c["test"] == "welch" and c["p"] == pytest.approx(p, rel=1e-6)
    assert c["p"] == pytest.approx(sps.ttest_ind(ACC["c"], ACC["a"], equal_var=False).pvalue)
    # a baseline as the control: the others are better or worse than it
    ranked = stats.rank(stats.summarize(trials(), ["test/acc"]), "test/acc", control="c")
    rows = by_config(ranked)
    assert [r["config"] for r in ranked] == ["a", "b", "c"]  # still best first
    assert rows["c"]["verdict"] == "control" and {r["vs"] for r in ranked} == {"c"}
    assert rows["a"]["difference"] > 0 and rows["a"]["verdict"] in ("better",
                                                                    "indistinguishable")
    text = stats.verdict(ranked, "test/acc")
    assert text.startswith("Against the baseline, lr=0.001, aug=flip")
    with pytest.raises(ValueError, match="control"):
        stats.rank(stats.summarize(trials(), ["test/acc"]), "test/acc", control="zz")


def test_rank_minimize_orders_by_smallest_mean():
    summary = stats.summarize(trials(), ["test/acc", "test/loss"])
    ranked = stats.rank(summary, "test/loss", direction="minimize")
    assert [r["config"] for r in ranked] == ["b", "a", "c"]  # 0.4 (n=2), 0.5, 0.8
    # b lacks seed 2's loss: its seeds differ from a's, so Welch's test
    assert ranked[1]["test"] == "welch"
    assert ranked[1]["p"] == pytest.approx(welch_by_hand(LOSS["a"], [0.3, 0.5])[2], rel=1e-6)
    assert [r["config"] for r in stats.rank(summary, "test/acc", "minimize")] == ["c", "b", "a"]
    with pytest.raises(ValueError):
        stats.rank(summary, "test/acc", direction="up")


def test_rank_cannot_test_single_seeds_and_puts_missing_last():
    rows = trials() + [
        {"config": "d", "axes": {"lr": 1.0, "aug": "none"}, "seed": 0,
         "metrics": {"test/acc": 0.5}},
        {"config": "e", "axes": {"lr": 2.0, "aug": "none"}, "seed": 0, "metrics": {}},
    ]
    summary = stats.summarize(rows, ["test/acc"])
    ranked = stats.rank(summary, "test/acc")
    assert [r["config"] for r in ranked] == ["a", "b", "c", "d", "e"]
    for r in ranked[3:]:
        assert math.isnan(r["p"]) and r["verdict"] == "untested"
    # a single lucky seed is not ranked, let alone best (issue 21: n=1 was ranked "best")
    rows.append({"config": "f", "axes": {"lr": 3.0, "aug": "none"}, "seed": 0,
                 "metrics": {"test/acc": 0.99}})
    ranked = stats.rank(stats.summarize(rows, ["test/acc"]), "test/acc")
    assert [r["config"] for r in ranked] == ["a", "b", "c", "f", "d", "e"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, None, None, None]
    assert ranked[3]["verdict"] == "untested"
    only_single = [r for r in rows if r["config"] in ("d", "e", "f")]
    ranked = stats.rank(stats.summarize(only_single, ["test/acc"]), "test/acc")
    assert all(r["rank"] is None for r in ranked)
    assert "none is ranked" in stats.verdict(ranked, "test/acc")
    # a study of one seed ranks its values (nothing can be tested, but the order is asked for)
    ranked = stats.rank(stats.summarize(only_single, ["test/acc"]), "test/acc", min_n=1)
    assert [(r["config"], r["rank"]) for r in ranked] == [("f", 1), ("d", 2), ("e", None)]
    assert [r["verdict"] for r in ranked] == ["control", "untested", "untested"]
    assert "1 untested" in stats.verdict(ranked, "test/acc")


def test_rank_needs_summarize_rows():
    public = [{k: v for k, v in r.items() if not k.startswith("_")}
              for r in stats.summarize(trials(), ["test/acc"])]
    with pytest.raises(ValueError, match="summarize"):
        stats.rank(public, "test/acc")


def test_constant_values_compare_exactly():
    rows = [{"config": k, "axes": {}, "seed": s, "metrics": {"m": v}}
            for k, v in (("x", 0.8), ("y", 0.8), ("z", 0.7)) for s in range(3)]
    ranked = stats.rank(stats.summarize(rows, ["m"]), "m")
    assert [(r["config"], r["p"], r["verdict"]) for r in ranked[1:]] == \
        [("y", 1.0, "indistinguishable"), ("z", 0.0, "worse")]


def test_equal_means_differ_by_exactly_zero_paired_and_welch():
    """Accuracies with equal sums have equal means: a difference of 0, not 3.7e-17 (the
    activations study showed one), and an effect size of 0."""
    from cifarx.studies import compare as cmp

    base = {0: 0.7302, 1: 0.7476, 2: 0.7201}
    other = {0: 0.7457, 1: 0.7316, 2: 0.7206}  # 21979 / 30000 both
    assert np.mean([other[s] - base[s] for s in base]) != 0  # the rounding this is about
    assert np.mean(list(other.values())) - np.mean(list(base.values())) != 0
    (paired,) = cmp.compare({"x": other, "base": base}, control="base")
    (welch,) = cmp.compare({"x": dict(zip((5, 6, 7), other.values())), "base": base},
                           control="base")
    for c in (paired, welch):
        assert c.difference == 0.0 and c.effect_size == 0.0 and c.p == pytest.approx(1.0)


def test_verdict_counts_and_what_the_seeds_could_miss():
    ranked = stats.rank(stats.summarize(trials(), ["test/acc"]), "test/acc")
    text = stats.verdict(ranked, "test/acc")
    counts = {v: sum(r["verdict"] == v for r in ranked) for v in ("worse", "indistinguishable")}
    assert text.startswith("Against the best, lr=0.1, aug=none (test/acc mean 0.82): ")
    assert "(paired t-tests (the same seeds), holm correction, alpha 0.05)." in text
    for v, n in counts.items():
        assert (f"{n} {v}" in text) == (n > 0)
    if counts["indistinguishable"]:
        assert "could miss a true difference under about" in text
    assert stats.verdict([], "test/acc").startswith("No configuration")


def test_verdict_names_set_axes_only_and_the_range_of_what_seeds_could_miss():
    """An axis a configuration leaves unset runs at its default: "wd=None" is not its name.
    What the seeds could miss is given for the least and the most steady configuration."""
    acc = {"a": [0.80, 0.81, 0.82], "b": [0.79, 0.80, 0.82], "c": [0.70, 0.80, 0.90]}
    axes = {"a": {"opt": "sgd", "wd": None}, "b": {"opt": "adam", "wd": 0.0},
            "c": {"opt": "ada", "wd": 0.0}}
    rows = [{"config": k, "axes": axes[k], "seed": s, "metrics": {"acc": v}}
            for k in acc for s, v in enumerate(acc[k])]
    ranked = stats.rank(stats.summarize(rows, ["acc"]), "acc", control="a")
    text = stats.verdict(ranked, "acc")
    assert text.startswith("Against the baseline, opt=sgd (acc mean 0.81): 2 indistinguishable")
    detectable = sorted(r["_detectable"] for r in ranked if r["verdict"] == "indistinguishable")
    assert (f"could miss a true difference under about {detectable[1] * 100:.1f} percentage "
            f"points ({detectable[0] * 100:.1f} percentage points for the steadiest "
            "configuration) (80% power).") in text


def test_csv_and_json_columns_order_and_float32_precision(tmp_path):
    """The axes first and the digest last; statistics at the precision of the float32
    accuracies they summarize (0.4427, not 0.44269999861717224: issue 21 item 7)."""
    summary = stats.summarize(trials(), ["test/acc", "test/loss"])
    path = tmp_path / "summary.csv"
    stats.to_csv(summary, path)
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    per_metric = ["n", "mean", "std", "ci_low", "ci_high"]
    assert lines[0] == ["lr", "aug"] + [f"test/acc_{s}" for s in per_metric] \
        + [f"test/loss_{s}" for s in per_metric] + ["config"]
    assert len(lines) == 4
    for line, row in zip(lines[1:], summary):
        record = dict(zip(lines[0], line))
        assert record["config"] == row["config"] and record["aug"] == row["aug"]
        assert float(record["lr"]) == row["lr"]  # an axis: as set
        for key in ("test/acc_std", "test/acc_ci_low", "test/acc_mean"):
            assert np.float32(float(record[key])) == np.float32(row[key])  # the same float32
            assert len(record[key]) <= 12, record[key]  # and no float64 digits beyond it
    assert stats.short(0.44269999861717224) == 0.4427
    assert stats.short(1e-50) == 1e-50 and math.isnan(stats.short(math.nan))
    # rank's rows: the same columns, then its three, the digest still last
    stats.to_csv(stats.rank(summary, "test/acc"), path)
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == lines[0][:-1] + ["rank", *stats.COMPARED, "config"]

    one = stats.summarize([{"config": "x", "axes": {"k": "v"}, "seed": 0,
                            "metrics": {"m": 0.5}}], ["m"])
    data = stats.to_json(one)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data == [{"config": "x", "k": "v", "m_n": 1, "m_mean": 0.5, "m_std": None,
                     "m_ci_low": None, "m_ci_high": None}]
    assert list(data[0]) == ["k", "m_n", "m_mean", "m_std", "m_ci_low", "m_ci_high", "config"]
    ranked = stats.to_json(stats.rank(summary, "test/acc"))
    assert [(r["config"], r["rank"], r["verdict"]) for r in ranked] == \
        [("a", 1, "control"), ("b", 2, "worse"), ("c", 3, "worse")]  # b: 0.02 below at every seed
    assert ranked[0]["p"] is None and "_values" not in ranked[0] and "_seeds" not in ranked[0]


def test_sweep_axes_figure():
    rows = trials() + [{"config": "d", "axes": {"lr": 0.1, "aug": "flip"}, "seed": 0,
                        "metrics": {"test/acc": 0.75}}]  # one seed: no interval
    summary = stats.summarize(rows, ["test/acc"])
    fig = figures.sweep_axes(summary, ["lr", "aug"], "test/acc", "sweep")
    try:
        lr_ax, aug_ax = fig.axes[:2]
        assert len([a for a in fig.axes if a.get_xlabel()]) == 2
        assert lr_ax.get_xscale() == "log"  # 0.001 .. 0.1
        assert aug_ax.get_xscale() == "linear"
        assert len(lr_ax.lines) == 2  # one series per aug value
        assert len(aug_ax.lines) == 3  # one series per lr value
        assert [t.get_text() for t in aug_ax.get_xticklabels()] == ["none", "flip"]
        assert sum(len(line.get_xdata()) for line in lr_ax.lines) == 4
        assert fig._suptitle.get_text() == "sweep"
    finally:
        plt.close(fig)
    fig = figures.sweep_axes(stats.summarize(trials(), ["test/acc"]), ["lr"], "test/acc", "one")
    try:
        assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    finally:
        plt.close(fig)


def test_sweep_curves_figure():
    curves = [(f"{key} seed {s}", key, [(100, v - 0.1), (200, v)])
              for key, values in ACC.items() for s, v in enumerate(values)]
    curves.append(("empty", "c", []))
    fig = figures.sweep_curves(curves, "a", "curves")
    try:
        (ax,) = fig.axes
        assert len(ax.lines) == 9
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["a seed 0", "a seed 1", "a seed 2", "other configurations"]
        highlighted = [line for line in ax.lines if line.get_linewidth() > 1]
        assert len(highlighted) == 3
    finally:
        plt.close(fig)


def test_the_ranked_table_keeps_every_value_whole_in_a_log_and_a_narrow_terminal(monkeypatch):
    import io

    from rich.console import Console

    from cifarx.cli import console

    long_axes = {key: {"weight-decay": 0.0005, "optimizer": f"nesterov-{key}" * 3}
                 for key in ACC}
    ranked = stats.rank(stats.summarize(trials(axes=long_axes), ["test/acc"]), "test/acc")
    table = console.sweep_table(ranked, ["optimizer", "weight-decay"], "test/acc")
    log = io.StringIO()  # a file: rich would assume 80 columns and cut cells to "8…"
    monkeypatch.setattr(console, "out", Console(file=log, width=80))
    console.print_whole(table)
    lines = log.getvalue().splitlines()
    assert max(map(len, lines)) > 80
    assert any("nesterov-a" * 3 in line and "82.00%" in line for line in lines)
    assert "…" not in log.getvalue()
    narrow = io.StringIO()  # a terminal of 60 columns: values fold, none is cut
    Console(file=narrow, width=60, force_terminal=True, color_system=None).print(table)
    assert "…" not in narrow.getvalue()
    assert max(map(len, narrow.getvalue().splitlines())) <= 60


def test_boolean_axes_read_as_the_study_writes_them(tmp_path):
    from rich.console import Console

    from cifarx.cli import console

    axes = {"a": {"batchnorm": True}, "b": {"batchnorm": False}, "c": {"batchnorm": False}}
    ranked = stats.rank(stats.summarize(trials(axes=axes), ["test/acc"]), "test/acc")
    stats.to_csv(ranked, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["batchnorm"] for r in rows] == ["true", "false", "false"]
    assert rows[0]["verdict"] == "control"
    printed = Console(width=200, color_system=None, record=True)
    printed.print(console.sweep_table(ranked, ["batchnorm"], "test/acc"))
    assert "│ true " in printed.export_text() and "True" not in printed.export_text()
