"""Models load from their weights and recipe, never from a pickle unless the user trusts it."""

import json
import os
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from cifarx import Architecture, UserError, hookimpl
from cifarx.runs import Tracking, train_run
from cifarx.testing import run_cli
from cifarx.tracking.models import load_model
from cifarx.tracking.weights import RECIPE, WEIGHTS, rebuilding
from cifarx.training.config import TrainConfig


def trained(data_dir, uri, **overrides):
    config = TrainConfig(**{**dict(data_dir=str(data_dir), iters=4, batch_size=20, eval_every=4,
                                   device="cpu", threads=1), **overrides})
    return train_run(config, Tracking(uri, "weights", "test"))


def test_a_trained_model_loads_from_its_weights_without_unpickling(data_dir, tracking_uri,
                                                                   monkeypatch):
    done = trained(data_dir, tracking_uri, arch="convonly", arch_options=("activation=silu",))
    files = {a.path for a in MlflowClient(tracking_uri).list_artifacts(done.run_id,
                                                                      "model/extra_files")}
    assert files == {f"model/extra_files/{WEIGHTS}", f"model/extra_files/{RECIPE}"}

    def no_pickles(*args, **kwargs):
        raise AssertionError("cifarx unpickled a model")

    monkeypatch.setattr(mlflow.pytorch, "load_model", no_pickles)
    monkeypatch.setattr(torch, "load", no_pickles)
    model = load_model(f"runs:/{done.run_id}/model", tracking_uri)
    pixels = torch.rand(3, 3, 32, 32)
    original = done.result.model.eval()
    assert torch.equal(model(pixels), original(pixels))
    assert model.classes == original.classes and not model.training


def test_mlflow_still_loads_the_pickled_module(data_dir, tracking_uri):
    done = trained(data_dir, tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{done.run_id}/model")
    assert isinstance(model, nn.Module) and model.classes == done.result.model.classes


class WritesAFile(nn.Module):
    """A model whose pickle writes a file when it is loaded: what a malicious run could log."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.layer = nn.Linear(2, 2)

    def __reduce__(self):
        return (Path(self.target).write_text, ("pwned",))


def test_a_pickle_is_refused_unless_trusted_and_then_it_runs(data_dir, tracking_uri, tmp_path,
                                                             monkeypatch):
    target = tmp_path / "written-by-the-pickle"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("weights")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(WritesAFile(str(target)), name="model",
                                 serialization_format="pickle", pip_requirements=["torch"])
    target.unlink(missing_ok=True)  # MLflow's logging may have loaded it once
    uri = f"runs:/{run.info.run_id}/model"
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(uri, tracking_uri)
    assert not target.exists()

    result = run_cli("evaluate", "--model", uri, "--tracking-uri", tracking_uri,
                     "--data-dir", data_dir)
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    assert not target.exists()

    monkeypatch.setenv("CIFARX_TRUST_PICKLE", "1")  # the user says they trust it: it runs
    with pytest.raises(Exception):
        load_model(uri, tracking_uri)  # a str, not a model, comes back from this pickle
    assert target.read_text() == "pwned"


def test_an_architecture_that_is_not_installed_is_named(data_dir, tracking_uri,
                                                        register_plugin):
    class Tiny:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="tiny-net", build=lambda num_classes, in_channels,
                                  image_size: nn.Sequential(nn.Flatten(), nn.Linear(
                                      in_channels * image_size ** 2, num_classes))))

    register_plugin(Tiny())
    done = trained(data_dir, tracking_uri, arch="tiny-net")
    from cifarx.plugin_api.registry import registry

    registry().unregister("test-plugin")
    with pytest.raises(UserError, match="tiny-net.*not installed|not installed.*tiny-net"):
        load_model(f"runs:/{done.run_id}/model", tracking_uri)
    register_plugin(Tiny())  # the fixture unregisters it again


def test_weights_that_do_not_fit_the_network_are_one_line(data_dir, tracking_uri, tmp_path):
    done = trained(data_dir, tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{done.run_id}/model",
                                                      tracking_uri=tracking_uri,
                                                      dst_path=str(tmp_path)))
    recipe = folder / "extra_files" / RECIPE
    spec = json.loads(recipe.read_text())
    spec["architecture"] = "convonly"  # trained as table1
    recipe.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="do not fit"):
        load_model(str(folder), tracking_uri)


def test_builds_see_that_they_rebuild_a_saved_model(data_dir, tracking_uri, register_plugin):
    seen = []

    class Watch:
        @hookimpl
        def register_architectures(self, register):
            def build(num_classes, in_channels, image_size):
                seen.append(rebuilding())
                return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2,
                                                             num_classes))
            register(Architecture(name="watch-net", build=build))

    register_plugin(Watch())
    done = trained(data_dir, tracking_uri, arch="watch-net")
    load_model(f"runs:/{done.run_id}/model", tracking_uri)
    assert seen[0] is False and seen[-1] is True


class Labkit:
    """A third-party architecture with a typed option, as version 0.4.0 declares it."""

    @hookimpl
    def register_architectures(self, register):
        from cifarx import Option

        def build(num_classes, in_channels, image_size, width=8):
            assert isinstance(width, int), f"width must be an int, got {width!r}"
            return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, num_classes))
        register(Architecture(name="labkit-net", build=build,
                              options={"width": Option(8, int, range="[1, 64]")}))


def saved_under_an_older_version(done, tracking_uri, tmp_path, **changes):
    """The model folder of ``done``, its recipe rewritten as an older plugin version wrote it."""
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{done.run_id}/model",
                                                      tracking_uri=tracking_uri,
                                                      dst_path=str(tmp_path)))
    recipe = folder / "extra_files" / RECIPE
    spec = json.loads(recipe.read_text())
    spec["plugins"]["architecture.labkit-net"] = "cifarx-labkit==0.3.0"
    spec["arch_options"].update(changes)
    recipe.write_text(json.dumps(spec))
    return folder


def test_options_saved_by_an_older_plugin_are_read_through_the_current_types(
        data_dir, tracking_uri, tmp_path, register_plugin, capsys):
    """A recipe holding "width": "32" crashed `transfer` with a 40-line TypeError."""
    register_plugin(Labkit(), "cifarx-labkit")
    done = trained(data_dir, tracking_uri, arch="labkit-net", arch_options=("width=8",))
    folder = saved_under_an_older_version(done, tracking_uri, tmp_path, width="8", gone="x")
    model = load_model(str(folder), tracking_uri)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(pixels), done.result.model.eval()(pixels))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert any("saved with cifarx-labkit==0.3.0; cifarx-labkit is installed" in w for w in warnings)
    assert any("option gone=x, which the installed plugin no longer has; left out" in w
               for w in warnings)
    assert all(w.startswith("cifarx: warning: ") for w in warnings) and len(warnings) == 2


def test_a_model_that_cannot_be_rebuilt_is_one_line(data_dir, tracking_uri, tmp_path,
                                                    register_plugin):
    register_plugin(Labkit(), "cifarx-labkit")
    done = trained(data_dir, tracking_uri, arch="labkit-net")
    folder = saved_under_an_older_version(done, tracking_uri, tmp_path, width="wide")
    result = run_cli("evaluate", "--model", folder, "--tracking-uri", tracking_uri,
                     "--data-dir", data_dir, plugins=[Labkit()])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("cifarx: error:")]
    assert "cannot be rebuilt: its architecture option width=wide is not accepted" in line
    assert "Traceback" not in result.output


def test_a_recipe_naming_another_architecture_is_one_line(data_dir, tracking_uri, tmp_path):
    """build_residual() got an unexpected keyword argument: a traceback."""
    done = trained(data_dir, tracking_uri, arch="convonly")
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{done.run_id}/model",
                                                      tracking_uri=tracking_uri,
                                                      dst_path=str(tmp_path)))
    recipe = folder / "extra_files" / RECIPE
    spec = json.loads(recipe.read_text())
    spec["architecture"] = "residual"
    recipe.write_text(json.dumps(spec))
    result = run_cli("evaluate", "--model", folder, "--tracking-uri", tracking_uri,
                     "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("cifarx: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "cannot be rebuilt" in errors[0] or "do not fit" in errors[0]


def test_a_trusted_pickle_that_is_not_a_model_is_one_line(tracking_uri, tmp_path, monkeypatch):
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("weights")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(nn.Linear(2, 2), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model",
                                                      dst_path=str(tmp_path)))
    torch.save({"not": "a model"}, next((folder / "data").glob("*.pth")))
    monkeypatch.setenv("CIFARX_TRUST_PICKLE", "1")
    with pytest.raises(UserError, match="its pickle does not load as a PyTorch model "
                                        r"\(AttributeError"):
        load_model(str(folder), tracking_uri)
