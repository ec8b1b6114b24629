"""`cifarx sweep` with search = "tpe": Optuna's TPE sampler picks the configurations, its
median pruner stops poor trials (their runs end FINISHED, tagged cifarx.pruned), and bad input
is one line that opens no run."""

import json
import tempfile

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cifarx import runs
from cifarx.cli import app
from cifarx.training import loop
from cifarx.training.config import TrainConfig

runner = CliRunner()

TRAIN = '''
[train]
arch = "table1"
iters = {iters}
batch-size = 10
eval-every = 2
device = "cpu"
threads = 1
data-dir = "{data_dir}"
'''


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def study_file(tmp_path, data_dir, head, iters=4):
    path = tmp_path / "study.toml"
    path.write_text(head + TRAIN.format(iters=iters, data_dir=data_dir))
    return path


def sweep_runs(uri, experiment):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs_ = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs_ if r.data.tags.get("cifarx.sweep") == "true"]
    children = [r for r in runs_ if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def sweep_json(uri, run_id):
    with tempfile.TemporaryDirectory() as tmp:
        with open(MlflowClient(uri).download_artifacts(run_id, "sweep.json", tmp)) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def searched(data_dir, tmp_path_factory):
    """A tpe search of 4 configurations over a log-uniform lr, 2 at once."""
    tmp = tmp_path_factory.mktemp("tpe")
    uri = f"sqlite:///{tmp}/mlflow.db"
    path = study_file(tmp, data_dir, '''
experiment = "tpe"
search = "tpe"
trials = 4
search-seed = 3
[random]
lr = {log-uniform = [1e-3, 0.3]}
''')
    return uri, cli("sweep", path, "--workers", "2", "--tracking-uri", uri)


def test_a_tpe_search_runs_its_configurations_as_children(searched):
    uri, result = searched
    assert result.exit_code == 0, result.output
    (parent,), children = sweep_runs(uri, "tpe")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    lrs = [float(r.data.params["lr"]) for r in children]
    assert len(set(lrs)) == 4 and all(1e-3 <= lr <= 0.3 for lr in lrs)
    assert parent.data.params["search"] == "tpe" and parent.data.params["configurations"] == "4"
    assert result.stderr.count("selects on final/test_acc, measured on the test set") == 1


def test_a_tpe_search_logs_the_best_and_the_importances(searched):
    uri, _ = searched
    (parent,), children = sweep_runs(uri, "tpe")
    client = MlflowClient(uri)
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/sweep_importances.png" in figures
    assert "optuna.journal" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    search = sweep_json(uri, parent.info.run_id)["search"]
    accs = {float(r.data.params["lr"]): r.data.metrics["final/test_acc"] for r in children}
    assert search["best"]["value"] == pytest.approx(max(accs.values()))
    assert accs[search["best"]["params"]["lr"]] == pytest.approx(max(accs.values()))
    assert search["importances"] == {"lr": pytest.approx(1.0)}
    assert [t["state"] for t in search["trials"]] == ["COMPLETE"] * 4


def test_the_pruner_stops_a_poor_trial_which_ends_finished(data_dir, tmp_path):
    """lr 0.05, then lr 1e-6 (search-seed 10 draws them in this order), one at a time: at
    iteration 4 the second's test accuracy is below the first's (11% against 25%)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = study_file(tmp_path, data_dir, '''
experiment = "pruning"
search = "tpe"
trials = 2
search-seed = 10
pruner = "median"
pruner-startup = 1
pruner-warmup = 3
[grid]
lr = [0.05, 1e-6]
''', iters=6)
    result = cli("sweep", path, "--workers", "1", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    (parent,), children = sweep_runs(uri, "pruning")
    assert all(r.info.status == "FINISHED" for r in children)
    (pruned,) = [r for r in children if r.data.tags.get("cifarx.pruned") == "true"]
    assert float(pruned.data.params["lr"]) == 1e-6
    assert pruned.data.tags["cifarx.stopped_at"] == "4"
    assert "final/test_acc" in pruned.data.metrics  # logged as a finished run's
    history = MlflowClient(uri).get_metric_history(pruned.info.run_id, "test/acc")
    assert [m.step for m in history] == [2, 4]
    assert parent.data.tags["cifarx.failed_trials"] == "none"
    assert parent.data.metrics["sweep/trials_failed"] == 0
    assert parent.data.metrics["sweep/trials_pruned"] == 1
    summary = sweep_json(uri, parent.info.run_id)
    assert [c["lr"] for c in summary["configurations"]] == [0.05]  # pruned: not in the stats
    assert summary["failed"] == [] and summary["pruned"][0]["run_id"] == pruned.info.run_id
    assert [t["state"] for t in summary["search"]["trials"]] == ["COMPLETE", "PRUNED"]
    assert "PRUNED: pruned at iteration 4" in result.output


def test_a_stop_from_a_listener_ends_training_cleanly(data_dir, tracking_uri):
    def listener(points):
        for key, _, step, _ in points:
            if key == "test/acc" and step == 2:
                raise loop.Pruned(step, "pruned at iteration 2")

    config = TrainConfig(arch="table1", iters=6, batch_size=10, eval_every=2, device="cpu",
                         threads=1, data_dir=str(data_dir))
    done = runs.train_run(config, runs.Tracking(tracking_uri, "stops"), [listener])
    assert done.result.steps == 2 and isinstance(done.result.stopped, loop.Pruned)
    assert [s for s, _ in done.result.history["test/acc"]] == [2]
    run = MlflowClient(tracking_uri).get_run(done.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cifarx.pruned"] == "true" and run.data.tags["cifarx.stopped_at"] == "2"
    assert run.data.metrics["final/test_acc"] == pytest.approx(done.result.test_acc)


def test_dry_run_lists_the_sampler_s_first_configurations(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = study_file(tmp_path, data_dir, '''
search = "tpe"
trials = 3
seeds = 2
[random]
lr = {log-uniform = [1e-3, 0.3]}
arch-opt.activation = {choice = ["relu", "silu"]}
''')
    result = cli("sweep", path, "--dry-run", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert "6 trials (3 configurations x 2 seeds) on local; no run opened" in result.stdout
    assert result.stdout.count("arch-opt.activation=") == 6
    again = cli("sweep", path, "--dry-run", "--tracking-uri", uri)
    assert again.stdout == result.stdout  # seeded by search-seed


@pytest.mark.parametrize("head, args, message", [
    ("", ["--search", "tpe", "--grid", "lr=0.05,0.1"], 'search = "tpe" needs trials = N'),
    ('search = "tpe"\ntrials = 2\npruner = "hyperband"\n[grid]\nlr = [0.05, 0.1]\n', [],
     "pruner = 'hyperband'; accepted: median, none"),
    ('pruner = "median"\n[grid]\nlr = [0.05, 0.1]\n', [], 'need search = "tpe"'),
    ('search = "tpe"\ntrials = 2\nmetric = "test/acc"\n[grid]\nlr = [0.05, 0.1]\n', [],
     "a tpe search optimizes what every trial reports"),
    ('search = "tpe"\ntrials = 2\n[random]\narch-opt.activation = {choice = ["relu", "tanh"]}\n',
     [], "activation=tanh: not accepted by table1"),
])
def test_bad_input_is_one_line_and_opens_no_run(data_dir, tmp_path, head, args, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = study_file(tmp_path, data_dir, head)
    result = cli("sweep", path, *args, "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error: ") and message in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or sweep_runs(uri, "cifarx-sweep") == ([], [])
