"""`cifarx report`: the statistics against scipy and hand computations on fixed numbers, and a
report of a tiny sweep: every section, HTML whose figures are embedded PNGs, the same bytes
twice, logged with the sweep, and bad input as one line."""

import base64
import html.parser
import json
import math

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats
from typer.testing import CliRunner

from cifarx.cli import app
from cifarx.studies import compare as cmp

runner = CliRunner()

A = {0: 0.71, 1: 0.74, 2: 0.72, 3: 0.75}
B = {0: 0.69, 1: 0.70, 2: 0.70, 3: 0.72}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_holm_and_bonferroni_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = .02, .03, .06, .04; running max
    assert cmp.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert cmp.adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert cmp.adjust(p, "none") == p
    assert cmp.adjust([0.5, float("nan")], "holm")[0] == 0.5  # NaN is not counted
    with pytest.raises(ValueError):
        cmp.adjust(p, "sidak")


def test_paired_comparison_against_scipy():
    (c,) = cmp.compare({"a": A, "b": B}, control="b")
    d = np.array([A[s] - B[s] for s in sorted(A)])
    assert c.test == "paired"
    assert c.p == pytest.approx(stats.ttest_rel(list(A.values()), list(B.values())).pvalue)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c.difference == pytest.approx(d.mean())
    assert c.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    se = d.std(ddof=1) / 2
    assert c.detectable == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * se)
    assert c.p_adjusted == c.p and c.significant == (c.p < 0.05)


def test_welch_comparison_against_scipy_when_the_seeds_differ():
    other = {10: 0.69, 11: 0.70, 12: 0.66}
    c, c2 = cmp.compare({"a": A, "base": other, "b": B}, control="base")
    a, b = np.array(list(A.values())), np.array(list(other.values()))
    assert c.test == "welch"
    assert c.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    v1, v2 = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    df = (v1 + v2) ** 2 / (v1 ** 2 / 3 + v2 ** 2 / 2)  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(v1 + v2)
    diff = a.mean() - b.mean()
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half))
    pooled = math.sqrt((3 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 5)
    assert c.effect_size == pytest.approx(diff / pooled * (1 - 3 / (4 * 7 - 9)))
    # two comparisons: Holm multiplies the smaller p by 2, the larger by 1 (kept monotone)
    small, large = sorted([c.p, c2.p])
    assert sorted([c.p_adjusted, c2.p_adjusted]) == pytest.approx(
        [min(1, 2 * small), max(min(1, 2 * small), large)])
    # the detectable difference uses the corrected alpha: 0.05 / 2
    assert c.detectable == pytest.approx(
        (stats.t.ppf(1 - 0.025 / 2, df) + stats.t.ppf(0.8, df)) * math.sqrt(v1 + v2))


def test_a_single_seed_is_not_tested_and_not_counted():
    c, c2 = cmp.compare({"a": {0: 0.7}, "b": B, "base": A}, control="base")
    assert c.test == "" and c.significant is None and math.isnan(c.p)
    assert c2.p_adjusted == c2.p  # the only tested comparison: nothing to correct


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = list(A.values())
    low, high = cmp.bootstrap_interval(values)
    assert (low, high) == cmp.bootstrap_interval(values)
    assert low < np.mean(values) < high
    assert all(math.isnan(x) for x in cmp.bootstrap_interval([0.5]))


class Checker(html.parser.HTMLParser):
    """Balanced tags, and every image an embedded PNG."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            src = dict(attrs)["src"]
            prefix = "data:image/png;base64,"
            if not src.startswith(prefix) or not base64.b64decode(
                    src[len(prefix):]).startswith(b"\x89PNG"):
                self.errors.append(f"image not embedded: {src[:40]}")
            self.images += 1
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('report')}/mlflow.db"
    result = cli("sweep", "--set", "iters=6", "--set", "batch-size=10", "--set", "eval-every=3",
                 "--set", "threads=1", "--set", f"data-dir={data_dir}", "--set", "probe=grad-max",
                 "--grid", "aug=normalize", "--grid", "aug=flip", "--seeds", "3", "--workers", "1",
                 "--tracking-uri", uri, "--experiment", "rep")
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("rep").experiment_id])
        if r.data.tags.get("cifarx.sweep") == "true"]
    return uri, parent.info.run_id


def test_report_of_a_sweep(swept, tmp_path):
    uri, sweep = swept
    out = tmp_path / "r"
    result = cli("report", "--sweep", sweep, "--baseline", "aug=normalize", "--out", out,
                 "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for section in ("Verdict", "Protocol", "Seeds and machine", "Metrics", "Figures",
                    "What the runs logged", "Runs"):
        assert section in page and section in md
    checker = Checker()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    assert checker.images >= 4  # curves, means, and the runs' own figures
    for name in (line.split("](figures/")[1].rstrip(")") for line in md.splitlines()
                 if "](figures/" in line):
        assert (out / "figures" / name).read_bytes().startswith(b"\x89PNG")
    assert "aug=normalize** " in md or "**aug=normalize**" in md
    # The report's p-value is scipy's paired t-test on the runs' own values (same seeds)
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_run(sweep).info.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == sweep]
    acc = {"flip": {}, "normalize": {}}
    for r in runs:
        aug = "flip" if "flip" in r.data.params["aug"] else "normalize"
        acc[aug][int(r.data.params["seed"])] = r.data.metrics["final/test_acc"]
    p = stats.ttest_rel([acc["flip"][s] for s in range(3)],
                        [acc["normalize"][s] for s in range(3)]).pvalue
    from cifarx.reports.report import _p
    assert f"| {_p(p)} |" in md
    # logged with the sweep, and the same bytes when made again
    logged = {a.path for a in client.list_artifacts(sweep, "report")}
    assert {"report/report.html", "report/report.md"} <= logged
    again = tmp_path / "again"
    assert cli("report", "--sweep", sweep, "--baseline", "aug=normalize", "--out", again,
               "--tracking-uri", uri).exit_code == 0
    assert (again / "report.html").read_bytes() == page.encode()
    assert (again / "report.md").read_text() == md


def test_bad_input_is_one_line(swept, tmp_path):
    uri, sweep = swept
    client = MlflowClient(uri)
    child = next(r.info.run_id for r in client.search_runs(
        [client.get_run(sweep).info.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == sweep)
    cases = [
        (["--sweep", child], "is not a sweep"),
        (["--sweep", sweep, "--baseline", "aug=crop"], "matches no configuration"),
        (["--sweep", sweep, "--baseline", "aug"], "accepted: PARAM=VALUE"),
        (["--runs", f"{child},{sweep}"], "have no metric"),
        (["--experiment", "nothing-here"], "no experiment"),
        (["--sweep", sweep, "--correction", "sidak"], "holm, bonferroni, none"),
        (["--sweep", sweep, "--runs", child + "," + child], "exactly one of"),
    ]
    for args, words in cases:
        result = cli("report", *args, "--out", tmp_path / "x", "--tracking-uri", uri)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cifarx: error:"), result.output
        assert words in lines[0], lines[0]
    client.create_experiment("empty")
    result = cli("report", "--experiment", "empty", "--tracking-uri", uri)
    assert result.exit_code == 2 and "no finished training run" in result.output


def test_reproduce_plans_every_step_under_dry_run(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli("reproduce", "assignment", "--quick", "--dry-run", "--data-dir", data_dir,
                 "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    part1 = [line for line in lines if line.startswith("part1 ")]
    part2 = [line for line in lines if line.startswith("part2 ")]
    assert len(part1) == 4 * 2 and len(part2) == 3 * 2  # configurations x the quick 2 seeds
    assert any("plain20" in line for line in part2)
    assert sum("ifgsm" in line for line in lines) == 4 and "no run opened" in lines[-1]
    assert MlflowClient(uri).search_experiments(filter_string="name = 'assignment-quick'") == []
    bad = cli("reproduce", "homework", "--tracking-uri", uri)
    assert bad.exit_code == 2 and "accepted: assignment" in bad.output


def test_a_reproduction_run_again_repeats_nothing(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ("reproduce", "assignment", "--seeds", "2", "--iters", "20", "--data-dir", data_dir,
            "--tracking-uri", uri, "--out", tmp_path / "out")
    first = cli(*args)
    assert first.exit_code == 0, first.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("assignment").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment], max_results=1000)}
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "0 trial(s) to run (8 done earlier)" in again.output
    assert "0 trial(s) to run (6 done earlier)" in again.output
    after = client.search_runs([experiment], max_results=1000)
    new = [r for r in after if r.info.run_id not in before]
    # only the second report's run is new: no trial, attack or transfer ran twice
    assert [r.info.run_name for r in new] == ["assignment report"]
    md = (tmp_path / "out" / "assignment.md").read_text()
    for number in ("1.1", "1.2", "1.3", "1.4", "2.1", "2.2", "2.3", "2.4", "3.1", "3.2"):
        assert f"## {number} " in md


def test_a_study_names_its_baseline_and_the_report_uses_it(data_dir, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(f'experiment = "based"\nseeds = 2\nbaseline = {{lr = 0.05}}\n[train]\n'
                     f'iters = 4\nbatch-size = 10\nthreads = 1\ndata-dir = "{data_dir}"\n'
                     '[grid]\nlr = [0.05, 0.1]\n')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli("sweep", study, "--workers", "1", "--tracking-uri", uri).exit_code == 0
    client = MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name(
        "based").experiment_id]) if r.data.tags.get("cifarx.sweep") == "true"]
    result = cli("report", "--sweep", parent.info.run_id, "--out", tmp_path / "r",
                 "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "against the baseline **lr=0.05**" in md and "| baseline |" in md
    # the sweep's own table, sweep.json and the report agree: the same control, test and p
    summary = json.loads(open(client.download_artifacts(parent.info.run_id, "sweep.json",
                                                        str(tmp_path))).read())
    by_lr = {c["lr"]: c for c in summary["configurations"]}
    ranked = {r["config"]: r for r in summary["ranked"]}
    control, other = ranked[by_lr[0.05]["config"]], ranked[by_lr[0.1]["config"]]
    assert control["verdict"] == "control" and other["vs"] == control["config"]
    assert other["test"] == "paired"
    from cifarx.reports.report import _p
    assert f"| {_p(other['p_adjusted'])} |" in md
    assert summary["verdict"].startswith("Against the baseline, lr=0.05")
    # --baseline on the command line names another control, checked as the file's key is
    result = cli("sweep", study, "--baseline", "lr=0.1", "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    result = cli("sweep", study, "--baseline", "lr=0.3", "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 2 and "--baseline: baseline lr = '0.3' is not one of the grid's" \
        in result.stderr
    result = cli("sweep", study, "--baseline", "lr", "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 2 and "--baseline 'lr': expected KEY=VALUE" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(study.read_text().replace("lr = 0.05}", "lr = 0.2}"))
    result = cli("sweep", bad, "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 2 and "baseline lr = 0.2 is not one of the grid's values" in \
        result.stderr
    bad.write_text(study.read_text().replace("{lr = 0.05}", "{iters = 4}"))
    result = cli("sweep", bad, "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 2 and "iters is not swept" in result.stderr
    # with [[configurations]], the baseline must name exactly one of the combinations
    listed = tmp_path / "listed.toml"
    listed.write_text(study.read_text().replace("baseline = {lr = 0.05}", "{baseline}") + (
        '[[configurations]]\noptimizer = "sgd"\n[[configurations]]\noptimizer = "adam"\n'))
    for baseline, found in (('{optimizer = "lion"}', 0), ('{optimizer = "adam"}', 2)):
        bad.write_text(listed.read_text().replace("{baseline}", f"baseline = {baseline}"))
        result = cli("sweep", bad, "--dry-run", "--tracking-uri", uri)
        assert result.exit_code == 2, result.output
        assert f"matches {found} configurations, not one; the configurations: " \
            "optimizer=sgd, lr=0.05; optimizer=sgd, lr=0.1; " in result.stderr
    bad.write_text(listed.read_text().replace(
        "{baseline}", 'baseline = {optimizer = "adam", lr = 0.1}'))
    assert cli("sweep", bad, "--dry-run", "--tracking-uri", uri).exit_code == 0


def test_configurations_are_named_by_their_options_not_by_parameter_counts():
    from cifarx.reports.data import RunRecord, group_runs

    def record(batchnorm, dropout, count, seed):
        params = {"arch": "table1", "arch.batchnorm": batchnorm, "arch.dropout": dropout,
                  "parameters": count, "trainable_parameters": count, "seed": str(seed)}
        return RunRecord(f"{batchnorm}{dropout}{seed}", "", "FINISHED", params, {}, {})

    records = [record(b, d, "145770" if b == "true" else "145578", s)
               for b in ("true", "false") for d in ("0.0", "0.5") for s in (0, 1)]
    groups = group_runs(records)
    assert [g.label for g in groups] == [
        "arch.batchnorm=true arch.dropout=0.0", "arch.batchnorm=true arch.dropout=0.5",
        "arch.batchnorm=false arch.dropout=0.0", "arch.batchnorm=false arch.dropout=0.5"]
    assert all(len(g.runs) == 2 for g in groups)


def test_a_label_drops_only_what_follows_one_other_option():
    """The defaults study: lr, schedule and weight decay alone tell its configurations apart,
    but the optimizer is what a reader looks for; the momentum follows the optimizer."""
    from cifarx.reports.data import RunRecord, group_runs

    settings = [("nesterov", "0.9", "0.1", "onecycle"), ("nesterov", "0.9", "0.05", "cosine"),
                ("adam", "0.9", "0.001", "none"), ("adagrad", "0.0", "0.05", "none"),
                ("rmsprop", "0.0", "0.001", "cosine")]
    records = [RunRecord(f"{o}{lr}{s}", "", "FINISHED", {"optimizer": o, "momentum": m, "lr": lr,
                                                          "schedule": s, "seed": "0"}, {}, {})
               for o, m, lr, s in settings]
    assert [g.label for g in group_runs(records)] == [
        "lr=0.1 optimizer=nesterov schedule=onecycle", "lr=0.05 optimizer=nesterov schedule=cosine",
        "lr=0.001 optimizer=adam schedule=none", "lr=0.05 optimizer=adagrad schedule=none",
        "lr=0.001 optimizer=rmsprop schedule=cosine"]
