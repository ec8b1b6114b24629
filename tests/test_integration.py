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


@needs_data
def test_part2_at_60_iterations_gradients_vanish_in_plain20_and_not_in_residual(tmp_path):
    """The reviewer's check, at one learning rate for the three nets. residual declares lr 0.02
    (at 0.1 it diverged after the one-cycle peak of a 2,000-iteration run), and at its own lr it
    has barely started after 60 iterations (train accuracy passes 18% at about iteration 110):
    the same lr, 0.1, compares the nets, not their learning rates."""
    import statistics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    found = {}
    for arch in ("convonly", "plain20", "residual"):
        result = CliRunner().invoke(app, [
            "train", "--arch", arch, "--aug", "normalize", "--probe", "grad-max", "--seed", "1",
            "--iters", "60", "--eval-every", "60", "--lr", "0.1", "--device", "cpu",
            "--tracking-uri", uri, "--experiment", "part2", "--run-name", arch])
        assert result.exit_code == 0, result.output
        (run,) = client.search_runs([client.get_experiment_by_name("part2").experiment_id],
                                    filter_string=f"attributes.run_name = '{arch}'")

        def history(key):
            return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                            key=lambda m: m.step)]
        found[arch] = (statistics.median(history("grad_max/first_conv")),
                       statistics.mean(history("train/acc")[-20:]))
    print({arch: f"G first {g:.3g}, train acc {acc:.1%}" for arch, (g, acc) in found.items()})
    g_conv = found["convonly"][0]
    assert found["plain20"][0] < 0.01 * g_conv and found["plain20"][1] < 0.15
    assert 0.1 * g_conv <= found["residual"][0] <= 100 * g_conv and found["residual"][1] >= 0.18
