"""`mlflow run` on the MLproject, and `cifarx ui`, as real subprocesses."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from mlflow import MlflowClient

from cifarx.tracking.models import load_model
from cifarx.training.config import TrainConfig, plan

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env_with(**extra):
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def test_mlflow_run_trains_into_the_run_it_started(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "-P", "arch=residual",
         "-P", "aug=flip,crop", "-P", "iters=20", "-P", "batch_size=20", "-P", "eval_every=10",
         "-P", f"data-dir={data_dir}", "-P", "threads=1", "-P", "device=cpu",
         "-P", "arch-opt=init=he", "--env-manager", "local", "--experiment-name", "project"],
        env=env_with(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("project").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["cifarx.arch"] == "residual"
    assert run.data.params["aug"] == "flip,crop"  # as mlflow run logged it from -P
    # The architecture's own defaults hold: the same lr as `cifarx train --arch residual`.
    assert run.data.params["lr"] == str(plan(TrainConfig(arch="residual", device="cpu")).config.lr)
    assert run.data.params["lr"] == "0.02" and run.data.params["arch.init"] == "he"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [10, 20]
    model = load_model(f"runs:/{run.info.run_id}/model", uri)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_localhost(tmp_path):
    port = free_port()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    server = subprocess.Popen([sys.executable, "-m", "cifarx", "ui", "--port", str(port),
                               "--tracking-uri", uri], env=env_with(), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the UI did not answer within 90 s"
                time.sleep(0.5)
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10") as r:
            assert b"Default" in r.read()
    finally:  # the UI runs worker processes: stop the whole process group
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_ui_on_a_busy_port_is_one_line_that_suggests_another(tmp_path):
    from cifarx.testing import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("ui", "--port", port, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"cifarx: error: --host 127.0.0.1 --port {port}: in use; choose another port "
        f"(--port {port + 1}) or stop what serves there"]


def test_ui_of_a_tracking_server_says_where_its_ui_is(tmp_path):
    from cifarx.testing import run_cli

    result = run_cli("ui", "--tracking-uri", "http://tracking.example:5000")
    assert result.exit_code == 0
    assert "http://tracking.example:5000 is an MLflow server: its UI is already there" in \
        result.output


def test_the_hint_after_a_run_opens_the_server_or_a_ui_command_that_works(monkeypatch):
    from cifarx.cli.console import ui_hint

    assert ui_hint("http://10.0.0.5:5000", "3", "abc") == \
        "open it: http://10.0.0.5:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    import shutil

    monkeypatch.setattr(sys, "argv", ["/somewhere/.venv/bin/cifarx", "train"])
    monkeypatch.setattr(shutil, "which", lambda name: None)  # make run: the venv is not on PATH
    assert ui_hint("sqlite:////data/runs.db", "1", "r1") == (
        "open it: /somewhere/.venv/bin/cifarx ui --tracking-uri 'sqlite:////data/runs.db'  ->  "
        "http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning")
    monkeypatch.setattr(shutil, "which", lambda name: "/somewhere/.venv/bin/cifarx")
    assert ui_hint("sqlite:////data/runs.db", "1", "r1").startswith("open it: cifarx ui ")
