"""The built-in executors run real (tiny) trials: `local` in worker processes, `ray` on a local
Ray; a failing trial, a dying worker and Ctrl-C each end only what they should."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
import sys
import time

import mlflow
import pytest

from cifarx import OptionError, UserError
from cifarx.plugin_api.registry import registry
from cifarx.studies.trials import EXECUTOR_TAG, TRIAL_TAG, Trial
from cifarx.training.config import TrainConfig

from fake_dists import activate, make_dist

DIE_PLUGIN = '''
    import os
    import signal

    from cifarx import Augmentation, hookimpl


    def die(images, generator):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


    @hookimpl
    def register_augmentations(register):
        register(Augmentation(name="test-die", stage="pixels", apply=die,
                              summary="kills the process that trains"))
'''


def executor(name: str):
    return registry().catalog().get("executor", name)


@pytest.fixture
def make_trials(tracking_uri, data_dir):
    """make_trials(executor, config changes, ...) -> trials of a new sweep run, one per change."""
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name("executors")
    experiment = found.experiment_id if found else client.create_experiment("executors")

    def make(name: str, *changes: dict) -> list[Trial]:
        parent = client.create_run(experiment, run_name=f"sweep {name}").info.run_id
        base = dict(iters=4, batch_size=10, eval_every=2, device="cpu", threads=1,
                    data_dir=str(data_dir))
        return [Trial(key=f"{parent[:8]}-{i}", number=i,
                      config=TrainConfig(**{**base, "seed": i, **change}), axes={"seed": i},
                      tracking_uri=tracking_uri, experiment="executors", parent=parent,
                      executor=name, run_name=f"trial {i}")
                for i, change in enumerate(changes)]
    return make


def children(trial: Trial) -> dict[str, mlflow.entities.Run]:
    """The child runs of ``trial``'s sweep, by trial key."""
    client = mlflow.MlflowClient(trial.tracking_uri)
    runs = client.search_runs([client.get_run(trial.parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{trial.parent}'")
    return {run.data.tags[TRIAL_TAG]: run for run in runs}


def test_local_runs_every_trial_in_its_workers(make_trials):
    trials = make_trials("local", *[{"threads": None}] * 4)
    outcomes = []
    executor("local").run(trials, outcomes.append, workers=2, threads=0)
    assert sorted(o.trial.number for o in outcomes) == [0, 1, 2, 3]
    assert [o.status for o in outcomes] == ["FINISHED"] * 4, [o.error for o in outcomes]
    assert all(0 <= o.metrics["final/test_acc"] <= 1 and o.curve for o in outcomes)
    runs = children(trials[0])
    assert set(runs) == {t.key for t in trials}
    assert {o.run_id for o in outcomes} == {r.info.run_id for r in runs.values()}
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags[EXECUTOR_TAG] == "local"
        # threads unset: the machine's cores split between the two workers
        assert run.data.params["threads"] == str(max(1, os.cpu_count() // 2))
    assert not multiprocessing.active_children()


def test_a_failing_trial_or_a_dying_worker_fails_only_that_trial(make_trials, tmp_path,
                                                                 monkeypatch):
    make_dist(tmp_path, "cifarx-test-die", "die_plugin", DIE_PLUGIN)
    activate(tmp_path, monkeypatch)  # the spawned workers inherit sys.path and find it
    trials = make_trials("local", {}, {"batch_size": 100_000}, {"aug": ("test-die",)}, {})
    outcomes = {}
    executor("local").run(trials, lambda o: outcomes.__setitem__(o.trial.number, o), workers=2)
    assert [outcomes[i].status for i in range(4)] == ["FINISHED", "FAILED", "FAILED", "FINISHED"]
    assert "larger than the" in outcomes[1].error
    died = outcomes[2]
    assert died.error == "worker died: killed by SIGKILL (out of memory?)"
    run = mlflow.MlflowClient(trials[0].tracking_uri).get_run(died.run_id)
    assert run.info.status == "FAILED"  # not left RUNNING
    assert run.data.tags["cifarx.error"] == died.error  # the run says why (issue 21 item 5)
    assert not multiprocessing.active_children()


def test_ctrl_c_ends_the_running_trials_killed_and_propagates(make_trials):
    trials = make_trials("local", {}, {"iters": 400})
    outcomes = []

    def heard(outcome):
        outcomes.append(outcome)
        if len(outcomes) == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, while the other worker's trial runs

    with pytest.raises(KeyboardInterrupt):
        executor("local").run(trials, heard, workers=2)
    assert [(o.trial.number, o.status) for o in outcomes] == [(0, "FINISHED"), (1, "KILLED")]
    assert not multiprocessing.active_children()
    statuses = {r.info.status for r in children(trials[0]).values()}
    assert "RUNNING" not in statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_check_fails_fast_and_says_why(make_trials, monkeypatch):
    pytest.importorskip("ray")
    check = executor("ray").check
    trials = make_trials("ray", {})
    start = time.monotonic()
    with pytest.raises(OptionError, match=r"address: nothing answers at 127\.0\.0\.1:\d+"):
        check(trials, address=f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"\$RAY_ADDRESS=ray://127.0.0.1:\d+: nothing answers"):
        check(trials)
    monkeypatch.delenv("RAY_ADDRESS")
    # a remote cluster cannot write to a SQLite file here: said before anything is contacted
    with pytest.raises(OptionError, match="cannot write to sqlite:.*mlflow server"):
        check(trials, address="ray://ray-head.invalid:10001")
    with pytest.raises(OptionError, match="trial_cpus: this machine has"):
        check(trials, trial_cpus=os.cpu_count() + 1)
    check(trials)  # a local Ray: nothing to contact
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UserError, match=r"needs Ray: pip install 'cifarx\[ray\]'"):
        check(trials)


def test_an_address_that_accepts_tcp_but_is_not_ray_is_one_line_within_seconds(
        data_dir, tmp_path):
    """A silent listener left `cifarx sweep` stuck for 5+ minutes with its run open."""
    pytest.importorskip("ray")
    import threading

    from typer.testing import CliRunner

    from cifarx.cli import app

    server, accepted = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)],
                     daemon=True).start()  # accepts, and never says a word
    port = server.getsockname()[1]
    start = time.monotonic()
    result = CliRunner().invoke(app, [
        "sweep", "--set", "iters=2", "--set", f"data-dir={data_dir}", "--executor", "ray",
        "--executor-opt", f"address=127.0.0.1:{port}", "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db"])
    seconds = time.monotonic() - start
    server.close()
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("cifarx:")]
    assert f"127.0.0.1:{port} accepts connections but does not answer as Ray does" in line
    assert seconds < 30 and accepted and not (tmp_path / "m.db").exists()


def test_a_real_ray_head_passes_the_probe(make_trials, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    except Exception as exc:  # a machine too loaded to start a Ray node: not what is tested
        ray.shutdown()
        pytest.skip(f"a local Ray did not start: {exc}")
    try:
        gcs = ray.get_runtime_context().gcs_address
        host, port = gcs.rsplit(":", 1)
        executor("ray").check(make_trials("ray", {}), address=f"127.0.0.1:{port}")
    finally:
        ray.shutdown()


def test_ray_runs_trials_on_a_local_ray(make_trials, monkeypatch, data_dir):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # the data folder only in the sweep's environment, as a user's CIFARX_DATA_DIR: the trials
    # carry it to the Ray workers (which would try to download CIFAR-10 without it)
    trials = [dataclasses.replace(t, config=dataclasses.replace(t.config, data_dir=None),
                                  env={"CIFARX_DATA_DIR": str(data_dir)}, host="sweep-host")
              for t in make_trials("ray", {}, {"threads": None})]
    monkeypatch.delenv("CIFARX_DATA_DIR", raising=False)
    outcomes = []
    executor("ray").run(trials, outcomes.append, address="", trial_cpus=1.0, trial_gpus=0.0)
    assert not ray.is_initialized()  # the local Ray it started is stopped
    assert sorted((o.trial.number, o.status) for o in outcomes) == \
        [(0, "FINISHED"), (1, "FINISHED")], [o.error for o in outcomes]
    runs = children(trials[0])
    assert {r.data.tags[EXECUTOR_TAG] for r in runs.values()} == {"ray"}
    assert runs[trials[1].key].data.params["threads"] == "1"  # from trial_cpus
    for run in runs.values():  # which node ran it, and cifarx, not Ray's worker script
        assert run.data.tags["cifarx.host"] == socket.gethostname()
        assert len(run.data.tags["cifarx.ray_node"]) == 56  # a Ray node id, in hex
        assert run.data.tags["mlflow.source.name"] == "cifarx"
        # the data folder came from the sweep's environment, not the Ray worker's
        assert run.data.params["data_dir"] == str(data_dir)


def test_the_local_executor_takes_a_trial_only_when_a_worker_is_free(make_trials):
    """A search asks for each trial when it is taken: it must know the results so far."""
    trials = make_trials("local", {}, {}, {})
    events = []

    def lazily():
        for trial in trials:
            events.append(("taken", trial.number))
            yield trial

    executor("local").run(lazily(), lambda o: events.append(("ended", o.trial.number)),
                          workers=1)
    assert events == [("taken", 0), ("ended", 0), ("taken", 1), ("ended", 1), ("taken", 2),
                      ("ended", 2)]


def test_a_run_left_running_by_a_dead_worker_ends_with_its_error(make_trials):
    """Whatever executor reported it (a plugin's own Outcome), the trial's run ends as the
    outcome says and carries its error (issue 21 item 5)."""
    from cifarx.studies.trials import Outcome, settle

    trial = make_trials("ray", {})[0]
    client = mlflow.MlflowClient(trial.tracking_uri)
    experiment = client.get_run(trial.parent).info.experiment_id
    left = client.create_run(experiment, tags={TRIAL_TAG: trial.key,
                                               "mlflow.parentRunId": trial.parent}).info.run_id
    outcome = Outcome(trial, "FAILED", error="worker died: ActorDiedError: the node\nwas lost")
    settle(outcome)
    run = client.get_run(left)
    assert outcome.run_id == left
    assert (run.info.status, run.data.tags["cifarx.error"]) == \
        ("FAILED", "worker died: ActorDiedError: the node was lost")
    settle(Outcome(trial, "FAILED", run_id=left, error="another"))  # its first error stays
    assert client.get_run(left).data.tags["cifarx.error"].startswith("worker died")


def test_a_trial_that_fails_on_another_machine_names_it(make_trials, monkeypatch, tmp_path):
    """A trial's failure elsewhere than the sweep's machine says where, and the sweep's
    environment (CIFARX_DATA_DIR) is what the trial used."""
    from cifarx.studies.trials import run_trial

    monkeypatch.delenv("CIFARX_DATA_DIR", raising=False)
    missing = tmp_path / "no-data-here"
    trial = dataclasses.replace(make_trials("local", {})[0], host="the-sweeps-machine",
                                env={"CIFARX_DATA_DIR": str(missing)})
    trial = dataclasses.replace(trial, config=dataclasses.replace(trial.config, data_dir=None))
    outcome = run_trial(trial)
    assert outcome.status == "FAILED"
    assert outcome.error.startswith(f"on {socket.gethostname()}: ")
    assert str(missing) in outcome.error
