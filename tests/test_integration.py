"""On real CIFAR-10, when CIFARX_DATA_DIR points at a folder holding cifar-10-batches-py."""

import os

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cifarx.cli import app

pytestmark = pytest.mark.integration
DATA = os.environ.get("CIFARX_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="CIFARX_DATA_DIR is not set")


@needs_data
def test_table1_with_normalize_flip_crop_reaches_40_percent_in_300_iterations(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, [
        "train", "--arch", "table1", "--aug", "normalize,flip,crop", "--iters", "300",
        "--eval-every", "300", "--device", "cpu", "--tracking-uri", uri, "--experiment", "ci"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ci").experiment_id])
    assert run.data.params["data_dir"] == DATA and run.data.params["train_split"] == "batch1"
    print(f"table1 normalize+flip+crop, 300 iterations: {run.data.metrics['final/test_acc']:.2%}")
    assert run.data.metrics["final/test_acc"] >= 0.40


@needs_data
def test_real_files_load_with_the_expected_shapes():
    from cifarx.plugins.datasets import load_cifar10

    data = load_cifar10(DATA, "all")
    assert data.train_images.shape == (50000, 3, 32, 32)
    assert data.test_images.shape == (10000, 3, 32, 32)
    assert data.train_labels.bincount().tolist() == [5000] * 10
