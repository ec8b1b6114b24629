"""`cifarx sweep` end to end on the local executor: child runs, a failing trial, resume, the
summary against a hand computation, and every bad input as one line that opens no run."""

import json
import socket
import math
import statistics
import tempfile

import pytest
from mlflow import MlflowClient
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from cifarx.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny(data_dir):
    return ["--set", "iters=4", "--set", "batch-size=10", "--set", "eval-every=2",
            "--set", "device=cpu", "--set", "threads=1", "--set", f"data-dir={data_dir}"]


def runs_of(uri, experiment):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
    """One sweep: lr 0.05 and 0.1 with 2 seeds, plus lr 1e12, which diverges."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('sweep')}/mlflow.db"
    result = cli("sweep", *tiny(data_dir), "--grid", "lr=0.05,0.1,1e12", "--seeds", "2",
                 "--workers", "2", "--tracking-uri", uri, "--experiment", "sweep",
                 "--register-model", "sweep-best", "--description", "tiny lr study",
                 "--tag", "owner=tests")
    return uri, result


def test_trials_are_complete_child_runs_of_the_sweep(swept):
    uri, result = swept
    assert result.exit_code == 0, result.output
    runs = runs_of(uri, "sweep")
    (parent,) = [r for r in runs if r.data.tags.get("cifarx.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 6
    assert {r.data.tags["cifarx.executor"] for r in [parent, *children]} == {"local"}
    finished = [r for r in children if r.info.status == "FINISHED"]
    # the sweep's console names each failed trial's error: shown if one fails unexpectedly
    assert len(finished) == 4, result.output
    assert all("final/test_acc" in r.data.metrics for r in finished)
    assert sorted(r.data.params["lr"] for r in finished) == ["0.05", "0.05", "0.1", "0.1"]
    # each trial's swept value as written, beside the value used (issue 21 item 7)
    assert sorted(r.data.params["axis.lr"] for r in children) == \
        ["0.05", "0.05", "0.1", "0.1", "1e12", "1e12"]
    # where it ran, and cifarx as its source, not the worker's interpreter (item 4)
    assert {(r.data.tags["cifarx.host"], r.data.tags["mlflow.source.name"])
            for r in [parent, *children]} == {(socket.gethostname(), "cifarx")}
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep lr"
    assert json.loads(parent.data.params["axis.lr"]) == ["0.05", "0.1", "1e12"]  # as written
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"sweep.json", "sweep.csv", "study.json", "figures"} <= artifacts


def test_the_best_trial_is_registered_and_the_sweep_described(swept):
    uri, result = swept
    client = MlflowClient(uri)
    (parent,) = [r for r in runs_of(uri, "sweep") if r.data.tags.get("cifarx.sweep") == "true"]
    assert parent.data.tags["mlflow.note.content"].startswith("tiny lr study\n\n**Best**: ")
    assert parent.data.tags["owner"] == "tests"
    version = client.get_model_version("sweep-best", "1")
    assert parent.data.tags["cifarx.registered_model"] == "sweep-best/1"
    with open(client.download_artifacts(parent.info.run_id, "sweep.json",
                                        tempfile.mkdtemp())) as f:
        summary = json.load(f)
    best = summary["ranked"][0]["config"]
    trial = client.get_run(version.run_id)
    best_seeds = [r for r in runs_of(uri, "sweep")
                  if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                  and r.info.status == "FINISHED"
                  and r.data.params["lr"] == trial.data.params["lr"]]
    assert trial.data.metrics["final/test_acc"] == max(
        r.data.metrics["final/test_acc"] for r in best_seeds)
    rows = {c["config"]: c for c in summary["configurations"]}
    assert float(rows[best]["lr"]) == float(trial.data.params["lr"])


def test_a_diverging_trial_fails_alone_and_is_reported(swept):
    uri, result = swept
    runs = runs_of(uri, "sweep")
    (parent,) = [r for r in runs if r.data.tags.get("cifarx.sweep") == "true"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 2 and all(r.data.params["lr"] == "1000000000000.0" for r in failed)
    assert all("cifarx.diverged_at" in r.data.tags for r in failed)
    assert len(parent.data.tags["cifarx.failed_trials"].split(",")) == 2
    assert "FAILED" in result.output and "training diverged" in result.output
    # the statistics say which seeds they lack, and how to get them (issue 21)
    assert (f"Missing 2 trial(s): lr=1e12 seed=0; lr=1e12 seed=1; `cifarx sweep --resume "
            f"{parent.info.run_id}` runs them again.") in " ".join(result.output.split())


def test_the_summary_matches_a_hand_computation(swept):
    uri, _ = swept
    runs = runs_of(uri, "sweep")
    (parent,) = [r for r in runs if r.data.tags.get("cifarx.sweep") == "true"]
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(parent.info.run_id, "sweep.json", tmp)) as f:
            summary = json.load(f)
    for row in summary["configurations"]:
        lr = row["lr"]
        accs = [r.data.metrics["final/test_acc"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") and r.info.status == "FINISHED"
                and float(r.data.params["lr"]) == float(lr)]
        mean, std = statistics.mean(accs), statistics.stdev(accs)
        half = scipy_stats.t.ppf(0.975, len(accs) - 1) * std / math.sqrt(len(accs))
        assert row["final/test_acc_n"] == 2
        assert row["final/test_acc_mean"] == pytest.approx(mean)
        assert row["final/test_acc_std"] == pytest.approx(std)
        assert row["final/test_acc_ci_low"] == pytest.approx(mean - half)
        assert row["final/test_acc_ci_high"] == pytest.approx(mean + half)
    assert len(summary["configurations"]) == 2  # the diverging one has no finished trial


def test_resume_runs_exactly_the_missing_and_failed_trials(swept, data_dir):
    uri, _ = swept
    before = runs_of(uri, "sweep")
    (parent,) = [r for r in before if r.data.tags.get("cifarx.sweep") == "true"]
    result = cli("sweep", "--resume", parent.info.run_id, "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert "4 trial(s) finished earlier were not run again" in result.output
    assert (f"sweep run {parent.info.run_id}: 2 trials to run on local (4 finished earlier)"
            in result.output)
    after = runs_of(uri, "sweep")
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert len(new) == 2 and all(r.data.params["lr"] == "1000000000000.0" for r in new)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in new)


def test_a_sweep_of_seeds_only_is_named_by_its_study(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli("sweep", *tiny(data_dir), "--seeds", "2", "--tracking-uri", uri,
                 "--experiment", "recipe")
    assert result.exit_code == 0, result.output
    (parent,) = [r for r in runs_of(uri, "recipe") if r.data.tags.get("cifarx.sweep")]
    assert parent.info.run_name == "sweep recipe, 2 seeds"


def test_dry_run_lists_the_trials_and_opens_no_run(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli("sweep", *tiny(data_dir), "--grid", "lr=0.05,0.1", "--grid",
                 "arch-opt.activation=relu,silu", "--seeds", "3", "--dry-run",
                 "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert "12 trials (4 configurations x 3 seeds) on local; no run opened" in result.stdout
    assert "lr=0.1 arch-opt.activation=silu seed=2" in result.stdout
    assert runs_of(uri, "cifarx-sweep") == []


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers=0: not accepted by local; accepted: a whole number in"),
    (["--executor", "slurm"], "unknown executor 'slurm'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--grid", "lr"], "--grid 'lr': expected KEY=VALUE"),
    (["--grid", "speed=1"], "unknown option 'speed'"),
    (["--grid", "optimizer=sgd,lion"], "unknown optimizer 'lion'"),
    (["--grid", "arch-opt.activation=relu,tanh"], "activation=tanh: not accepted by table1"),
    (["--executor-opt", "colour=red"], "local has no option 'colour'"),
])
def test_bad_input_is_one_line_and_opens_no_run(data_dir, tmp_path, args, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = cli("sweep", *tiny(data_dir), *args, "--tracking-uri", uri, "--dry-run")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error: ") and message in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or runs_of(uri, "cifarx-sweep") == []


def test_bad_study_files_and_resume_targets_are_one_line(tmp_path, tracking_uri):
    bad = tmp_path / "bad.toml"
    bad.write_text("seeds = [")
    result = cli("sweep", bad, "--tracking-uri", tracking_uri)
    assert result.exit_code == 2 and "not valid TOML" in result.stderr
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name("plain")
    experiment = found.experiment_id if found else client.create_experiment("plain")
    plain = client.create_run(experiment).info.run_id
    result = cli("sweep", "--resume", plain, "--tracking-uri", tracking_uri)
    assert result.exit_code == 2 and "is not a sweep" in result.stderr


def test_a_resumed_sweep_continues_an_interrupted_trial_from_its_checkpoint(data_dir, tmp_path):
    import time

    from cifarx.runs import CHECKPOINT
    from cifarx.studies.study import from_dict
    from cifarx.studies.sweep import sweep_run
    from cifarx.studies.sweep_plan import plan_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = from_dict({"experiment": "ckpt-sweep", "seeds": 1, "train": {
        "batch-size": 10, "eval-every": 50, "device": "cpu", "threads": 1,
        "data-dir": str(data_dir), "checkpoint-every": 5}, "grid": {"iters": [4, 2000]}})
    sweep = plan_sweep(study, "local", ["workers=2"], uri=uri)
    client = MlflowClient(uri)

    def long_trial_checkpointed(outcome, done, total):
        deadline = time.time() + 120  # the short trial ended: wait for the long one's checkpoint
        while time.time() < deadline:
            for run in runs_of(uri, "ckpt-sweep"):
                if run.data.params.get("iters") == "2000" and CHECKPOINT in {
                        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}:
                    raise KeyboardInterrupt  # Ctrl-C
            time.sleep(0.5)

    with pytest.raises(KeyboardInterrupt):
        sweep_run(sweep, on_outcome=long_trial_checkpointed)
    (killed,) = [r for r in runs_of(uri, "ckpt-sweep") if r.info.status == "KILLED"
                 and r.data.params.get("iters") == "2000"]
    (parent,) = [r for r in runs_of(uri, "ckpt-sweep") if r.data.tags.get("cifarx.sweep")]
    done = sweep_run(sweep, resume=parent.info.run_id)
    assert [o.run_id for o in done.outcomes] == [killed.info.run_id]  # the same run, continued
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and "final/test_acc" in run.data.metrics
    assert len(runs_of(uri, "ckpt-sweep")) == 3  # the sweep and its two trials, no new one


def test_a_sweep_whose_every_trial_failed_exits_1_and_a_resume_that_completes_them_says_so(
        data_dir, tmp_path, register_plugin):
    """Every trial failed and the sweep exited 0; a resume that completed them left the
    failed-trials tag stale; a resume overwrote sweep/seconds; the sweep run did not record its
    executor's package."""
    from cifarx import Executor, hookimpl
    from cifarx.studies.trials import Outcome, run_trial

    calls = []

    class Flaky:  # fails every trial the first time, runs them (in this process) after
        @hookimpl
        def register_executors(self, register):
            def run(trials, on_outcome):
                calls.append(1)
                for trial in trials:
                    on_outcome(run_trial(trial) if len(calls) > 1 else
                               Outcome(trial, "FAILED", error="the cluster was down"))
            register(Executor(name="flaky", run=run))

    register_plugin(Flaky(), "flaky-package")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = cli("sweep", *tiny(data_dir), "--grid", "lr=0.05,0.1", "--executor", "flaky",
                "--tracking-uri", uri, "--experiment", "flaky")
    assert first.exit_code == 1, first.output
    assert "cifarx: error: every trial failed (2 of 2" in first.stderr
    (parent,) = runs_of(uri, "flaky")
    assert parent.data.tags["cifarx.failed_trials"] == "0,1"
    assert parent.data.tags["cifarx.plugin.executor.flaky"] == "flaky-package=="
    # a resume runs on the executor the sweep ran on (it ran locally unless told again)
    planned = cli("sweep", "--resume", parent.info.run_id, "--dry-run", "--tracking-uri", uri)
    assert "2 trials (2 configurations x 1 seeds) on flaky; no run opened" in planned.stdout
    again = cli("sweep", "--resume", parent.info.run_id, "--tracking-uri", uri)
    assert again.exit_code == 0, again.output
    assert f"sweep run {parent.info.run_id}: 2 trials to run on flaky" in again.stderr
    client = MlflowClient(uri)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["cifarx.failed_trials"] == "none"
    seconds = client.get_metric_history(parent.info.run_id, "sweep/seconds")
    assert sorted(m.step for m in seconds) == [0, 1]  # each invocation's own
    assert parent.data.metrics["sweep/total_seconds"] == pytest.approx(
        sum(m.value for m in seconds))


def test_executor_flags_win_over_the_study_file(data_dir, tmp_path):
    """`--executor-opt workers=1` on a study with [executor] workers = 2 was "given twice"."""
    study = tmp_path / "study.toml"
    study.write_text(f'[train]\niters = 4\nbatch-size = 10\ndata-dir = "{data_dir}"\n'
                     '[grid]\nlr = [0.05, 0.1]\n[executor]\nname = "local"\nworkers = 2\n')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for args in (["--executor-opt", "workers=1"], ["--workers", "1"]):
        result = cli("sweep", study, *args, "--dry-run", "--tracking-uri", uri)
        assert result.exit_code == 0, result.output
        assert "2 trials (2 configurations x 1 seeds) on local" in result.stdout
