"""The example third-party package, pip-installed for real, used through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifarx-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """pip-install the example into its own folder; the environment that puts it on the path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target",
                    str(target), str(EXAMPLE)], check=True)
    return {**os.environ, "PYTHONPATH": str(target), "MLFLOW_DISABLE_TELEMETRY": "true"}


def cifarx(*args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "cifarx", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cifarx_plugins_lists_the_installed_package(installed):
    listed = json.loads(cifarx("plugins", "--json", env=installed).stdout)["plugins"]
    mine = {(r["kind"], r["name"]): r for r in listed if r["package"] == "cifarx-example-plugin"}
    assert set(mine) == {("architecture", "tiny"), ("augmentation", "cutout")}
    assert mine[("architecture", "tiny")]["version"] == "0.1.0"


def test_train_with_the_plugins_architecture_and_augmentation(installed, data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = cifarx("train", "--arch", "tiny", "--aug", "cutout,flip", "--data-dir", data_dir,
                  "--iters", "30", "--batch-size", "20", "--eval-every", "10", "--device", "cpu",
                  "--tracking-uri", uri, "--experiment", "example", env=installed, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("example").experiment_id])
    assert run.data.params["aug"] == "flip,normalize,cutout"
    assert run.data.params["lr"] == "0.1"  # the plugin's declared default
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 30
    assert 0 <= run.data.metrics["final/test_acc"] <= 1


def test_the_allow_list_can_leave_it_out(installed):
    env = {**installed, "CIFARX_LOAD_PLUGINS": "some-other-package"}
    done = cifarx("plugins", "--json", env=env)
    names = {r["name"] for r in json.loads(done.stdout)["plugins"]}
    assert "tiny" not in names and "table1" in names
