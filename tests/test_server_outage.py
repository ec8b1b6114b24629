"""A tracking server that fails: a real `mlflow server` on 127.0.0.1, killed and restarted by
the tests while a tiny training logs to it (cifarx.spool)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from cifarx.cli import console
from cifarx.testing import run_cli
from cifarx.tracking import server as tracking_server, spool, sync
from cifarx.tracking.models import load_model
from cifarx.tracking.run import as_logged

TRAIN = ["--iters", "60", "--batch-size", "20", "--eval-every", "20", "--threads", "1",
         "--device", "cpu", "--aug", "flip", "--no-system-metrics", "--experiment", "outage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` with a SQLite store in ``folder``, on a free port; killed with its
    workers (its own process group)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, limit: float = 90):
        mlflow = Path(sys.executable).with_name("mlflow")
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + limit
        while tracking_server.silence(self.uri) is not None:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.25)

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    found = Server(tmp_path_factory.mktemp("server"))
    found.start()
    yield found
    found.kill()


@pytest.fixture
def spool_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(spool.SPOOL_ENV, str(tmp_path / "spool"))
    monkeypatch.setattr(spool, "RECHECK_S", 0.2)
    return tmp_path / "spool"


@pytest.fixture
def at_step(monkeypatch):
    """``at_step({20: action})``: the CLI's progress listener runs each action once, when the
    training reaches that step; returns the metric points the training measured."""
    def install(actions):
        measured, update = [], console.TrainingProgress.update

        def listener(self, points):
            update(self, points)
            measured.extend(points)
            for step in sorted(actions):
                if any(p[2] >= step for p in points):
                    actions.pop(step)()

        monkeypatch.setattr(console.TrainingProgress, "update", listener)
        return measured

    return install


def run_id_of(result) -> str:
    return next(line.split()[1] for line in result.stdout.splitlines()
                if line.startswith("run "))


def history(client, run_id, measured):
    """The run's stored history of each key the training measured, and what it measured."""
    keys = {p[0] for p in measured}
    stored = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
              for k in keys}
    expected = {k: sorted((step, as_logged(v)) for key, v, step, _ in measured if key == k)
                for k in keys}
    return stored, expected


@pytest.mark.parametrize("command", [
    ["train", "--iters", "5"], ["evaluate", "--model", "runs:/0123/model"],
    ["attack", "--model", "runs:/0123/model"], ["analyze", "--analysis", "per-class",
                                                 "--model", "runs:/0123/model"],
    ["transfer", "--adversarial", "0123", "--model", "runs:/0123/model"],
    ["sweep", "--set", "iters=5"]])
def test_a_server_that_does_not_answer_is_one_line_at_start(command, data_dir, spool_dir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_cli(*command, "--tracking-uri", uri, catch_exceptions=True)
    took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"cifarx: error: the tracking server {uri} does not answer (")
    assert "--tracking-uri" in result.stderr
    assert took < 10
    assert not spool_dir.exists()


def test_a_run_whose_server_dies_ends_in_a_spool_that_sync_completes(
        server, data_dir, spool_dir, at_step):
    measured = at_step({30: server.kill})
    result = run_cli("train", *TRAIN, "--data-dir", data_dir, "--tracking-uri", server.uri,
                     "--run-name", "outage")
    assert result.exit_code == 0, result.output
    run_id = run_id_of(result)
    assert result.stderr.count("lost the tracking server") == 1
    assert "nothing is lost" in result.stderr
    folder = spool_dir / run_id
    assert f"ended without its tracking server: everything it logged is in {folder}" \
        in " ".join(result.stderr.split())
    manifest = spool.Spool(folder).manifest
    assert manifest["tracking_uri"] == server.uri and manifest["folder"] == str(folder)
    assert spool.Spool(folder).records() > 3 and not manifest.get("synced")

    refused = run_cli("sync", catch_exceptions=True)  # the server is still down
    assert refused.exit_code == 2 and "does not answer" in refused.stdout
    server.start()
    synced = run_cli("sync")
    assert synced.exit_code == 0, synced.output
    assert f"run {run_id} (outage)" in synced.stdout and "uploaded" in synced.stdout

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "outage"
    assert run.info.end_time > run.info.start_time
    stored, expected = history(client, run_id, measured)
    assert stored == expected and len(stored["train/loss"]) == 60
    assert max(s for s, _ in stored["test/acc"]) == 60
    assert "final/test_acc" in run.data.metrics and run.data.params["iters"] == "60"
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/training.png"]
    model = load_model(f"runs:/{run_id}/model", server.uri)
    assert model.classes[0] == "airplane"
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1

    # Twice: nothing is sent again, and nothing changes.
    again = run_cli("sync")
    assert again.exit_code == 0 and "nothing to sync" in again.stdout
    named = run_cli("sync", run_id)
    assert named.exit_code == 0 and "synced earlier" in named.stdout
    assert history(client, run_id, measured)[0] == stored
    assert len(client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")) == 1
    # The SQL store ignores a metric point sent twice (what a re-sent batch relies on).
    first = client.get_metric_history(run_id, "train/loss")[0]
    client.log_batch(run_id, metrics=[Metric(first.key, first.value, first.timestamp,
                                             first.step)])
    assert len(client.get_metric_history(run_id, "train/loss")) == 60


def test_a_server_that_comes_back_during_the_run_gets_the_rest(
        server, data_dir, spool_dir, at_step):
    server.start() if tracking_server.silence(server.uri) else None
    measured = at_step({20: server.kill, 40: server.start})
    result = run_cli("train", *TRAIN, "--data-dir", data_dir, "--tracking-uri", server.uri)
    assert result.exit_code == 0, result.output
    run_id = run_id_of(result)
    assert result.stderr.count("lost the tracking server") == 1
    assert "answers again" in result.stderr and "ended without" not in result.stderr
    assert spool.Spool(spool_dir / run_id).synced  # all of it went to the server
    assert run_cli("sync").stdout.startswith("nothing to sync")

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    stored, expected = history(client, run_id, measured)
    assert stored == expected and len(stored["train/loss"]) == 60
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/training.png"]
    assert load_model(f"runs:/{run_id}/model", server.uri).classes[0] == "airplane"


def test_only_a_server_that_is_missing_counts_as_an_outage():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    def http_error(status):
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    assert tracking_server.is_outage(MlflowException("API request to http://x failed with exception ..."))
    assert tracking_server.is_outage(requests.ConnectionError()) and tracking_server.is_outage(http_error(503))
    assert not tracking_server.is_outage(RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                              "message": "bad value"}))
    assert not tracking_server.is_outage(http_error(404)) and not tracking_server.is_outage(ValueError())


def test_a_link_spools_in_order_while_the_server_is_lost_and_uploads_when_back(
        tmp_path, spool_dir, monkeypatch):
    from mlflow.exceptions import MlflowException, RestException

    sent, down = [], [True]

    def apply(kind, payload):
        if down[0]:
            raise MlflowException("API request to http://x failed: Connection refused")
        if payload.get("bad"):
            raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no"})
        sent.append((kind, Path(payload["file"]).read_text() if kind == "artifact"
                     else payload))

    link = spool.Link("http://127.0.0.1:9", "run1", "name", "0", apply,
                      unsent=lambda: [("metrics", {"points": [["a", 1.0, 1, 5]]})])
    note = tmp_path / "note.txt"
    note.write_text("first")
    link.deliver("tags", {"tags": {"t": "1"}})  # fails: the writer's batch, then this, spooled
    link.deliver("artifact", {"file": str(note), "dir": "notes"})
    note.write_text("changed after")  # the spool keeps a copy
    assert link.lost and sent == [] and link.spool.records() == 3
    assert not sync.sync([spool.Spool(spool_dir / "run1")])[0].records  # still being written

    down[0] = False
    monkeypatch.setattr(tracking_server, "silence", lambda uri, timeout=None: None)
    assert link.live(recheck=True)  # the server answers: the spool is uploaded first
    link.deliver("params", {"params": {"p": "2"}})
    assert sent == [("metrics", {"points": [["a", 1.0, 1, 5]]}), ("tags", {"tags": {"t": "1"}}),
                    ("artifact", "first"), ("params", {"params": {"p": "2"}})]
    with pytest.raises(RestException):  # an error the server answered with is not spooled
        link.deliver("params", {"bad": True})
    assert link.close() is None and spool.Spool(spool_dir / "run1").synced
