import importlib.metadata
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from cifarx import Architecture, Probe, UserError, hookimpl
from cifarx.runs import Tracking, train_run
from cifarx.tracking.lifecycle import start_run
from cifarx.tracking.models import load_model, requirements_for
from cifarx.tracking.run import MetricLog, Run
from cifarx.training.config import TrainConfig


def quick(data_dir, **overrides):
    settings = dict(data_dir=str(data_dir), iters=30, batch_size=20, eval_every=10, device="cpu",
                    threads=1)
    return TrainConfig(**{**settings, **overrides})


def tracked(config, uri, name="test"):
    done = train_run(config, Tracking(uri, "tests", name))
    return done.run_id, done.result


def test_a_run_logs_params_tags_metrics_figure_model_and_dataset(data_dir, tracking_uri, in_tmp):
    run_id, result = tracked(quick(data_dir), tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == "table1" and run.data.params["aug"] == "flip,normalize,crop"
    assert run.data.params["iters"] == "30" and run.data.params["lr"]
    assert run.data.tags["cifarx.arch"] == "table1" and run.data.tags["cifarx.device"] == "cpu"
    assert run.data.tags["cifarx.aug"] == "flip,normalize,crop"
    assert {"cifarx.version", "cifarx.torch", "cifarx.threads"} <= set(run.data.tags)
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 31))
    assert [m.step for m in client.get_metric_history(run_id, "test/acc")] == [10, 20, 30]
    assert run.data.metrics["final/test_acc"] == pytest.approx(result.test_acc)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/training.png"]
    inputs = run.inputs.dataset_inputs
    assert inputs[0].dataset.name == "cifar10-batch1" and str(data_dir) in inputs[0].dataset.source

    model = load_model(f"runs:/{run_id}/model", tracking_uri)
    pixels = torch.rand(4, 3, 32, 32)
    result.model.eval()
    assert torch.allclose(model(pixels), result.model(pixels), atol=1e-6)
    assert model.classes == result.model.classes
    model.train()  # the original nn.Module comes back, so eval()/train() work
    model.eval()


def test_requirements_pin_cifarx_and_torch():
    pins = requirements_for(nn.Sequential(nn.Linear(2, 2)))
    assert any(p.startswith("cifarx==") for p in pins)
    assert f"torch=={importlib.metadata.version('torch')}" in pins


def test_distribution_scan_is_kept_per_environment(tmp_path, monkeypatch):
    """The installed distributions are scanned once per environment: again after an install,
    or when the cache is unreadable; an unwritable cache only costs the scan."""
    from cifarx.tracking import models

    site = tmp_path / "site"
    (site / "demo-1.0.dist-info").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(site)])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scans = []

    def scan():
        scans.append(1)
        return {"torchgen": ["torch"], "torch": ["torch"], "demo": ["demo"]}

    assert list(models._cached_scan(scan)) == ["torchgen", "torch", "demo"]
    found = models._cached_scan(scan)
    assert list(found) == ["torchgen", "torch", "demo"] and found["demo"] == ["demo"]
    assert len(scans) == 1  # in order, from the cache (MLflow inverts it: order matters)
    (site / "other-2.0.dist-info").mkdir()  # an install
    models._cached_scan(scan)
    assert len(scans) == 2
    for cached in (tmp_path / "cache" / "cifarx").glob("*.json"):
        cached.write_text("{")
    models._cached_scan(scan)
    assert len(scans) == 3
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert models._cached_scan(scan)["torch"] == ["torch"] and len(scans) == 4


def test_distribution_maps_unused_for_a_month_are_pruned(tmp_path, monkeypatch):
    """A new map drops the ones no environment has read for 30 days; a map in use is kept."""
    import os
    import time

    from cifarx.tracking import models

    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    (tmp_path / "site" / "demo-1.0.dist-info").mkdir(parents=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "cifarx"
    folder.mkdir(parents=True)
    month_ago = time.time() - 31 * 86400
    for name in ("distributions-stale.json", "distributions-used.json", "distributions-new.json"):
        (folder / name).write_text("{}")
        os.utime(folder / name, (month_ago, month_ago))
    os.utime(folder / "distributions-new.json")  # another environment's, recent
    monkeypatch.setattr(models, "_installed", lambda: "used")
    models._cached_scan(dict)  # a hit: marks it used, prunes nothing
    monkeypatch.setattr(models, "_installed", lambda: "fresh")
    models._cached_scan(dict)  # a miss: written, and the stale one dropped
    assert sorted(p.name for p in folder.iterdir()) == [
        "distributions-fresh.json", "distributions-new.json", "distributions-used.json"]


    def read_only(*args):
        raise PermissionError("a cache another user made")

    monkeypatch.setattr(os, "utime", read_only)
    assert models._cached_scan(lambda: pytest.fail("a readable cache is a hit")) == {}


class Exploding:
    """An architecture whose forward fails on its 12th call, and a probe that interrupts."""

    @hookimpl
    def register_architectures(self, register):
        class Net(nn.Sequential):
            calls = 0

            def forward(self, x):
                Net.calls += 1
                if Net.calls == 12:
                    raise RuntimeError("exploded")
                return super().forward(x)

        register(Architecture(name="test-exploding", build=lambda **kw: Net(
            nn.Flatten(), nn.Linear(3 * 32 * 32, 10))))

    @hookimpl
    def register_probes(self, register):
        def attach(net):
            steps = []

            def read():
                steps.append(1)
                if len(steps) == 8:
                    raise KeyboardInterrupt
                return {}
            return read
        register(Probe(name="test-ctrl-c", attach=attach))


def test_a_run_that_raises_ends_failed_and_keeps_its_metrics(data_dir, tracking_uri, in_tmp,
                                                              register_plugin):
    register_plugin(Exploding(), "exploding")
    with pytest.raises(RuntimeError, match="exploded"):
        tracked(quick(data_dir, arch="test-exploding", eval_every=1000), tracking_uri)
    run = MlflowClient(tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("tests").experiment_id], order_by=["start_time DESC"])[0]
    assert run.info.status == "FAILED"
    assert run.data.params["arch"] == "test-exploding"
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 12))


def test_ctrl_c_ends_the_run_killed(data_dir, tracking_uri, in_tmp, register_plugin):
    register_plugin(Exploding(), "exploding")
    with pytest.raises(KeyboardInterrupt):
        tracked(quick(data_dir, probes=("test-ctrl-c",)), tracking_uri, name="killed")
    run = MlflowClient(tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("tests").experiment_id],
        filter_string="attributes.run_name = 'killed'")[0]
    assert run.info.status == "KILLED"
    assert len(MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/loss")) == 7


def test_inside_mlflow_run_it_logs_into_the_run_mlflow_started(tracking_uri, in_tmp, monkeypatch):
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("outer") if not client.get_experiment_by_name("outer") \
        else client.get_experiment_by_name("outer").experiment_id
    outer = client.create_run(experiment)
    client.log_param(outer.info.run_id, "lr", "1e-1")  # as `mlflow run -P lr=1e-1` logs it
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    with start_run(tracking_uri, "ignored", "ignored") as run:
        assert run.id == outer.info.run_id
        run.log_params({"lr": 0.1, "iters": 5})
    params = client.get_run(outer.info.run_id).data.params
    assert params == {"lr": "1e-1", "iters": "5"}
    assert client.get_run(outer.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("uri", ["bogus://somewhere", "sqlite:///{tmp}/a-file/mlflow.db",
                                 "sqlite:///{tmp}/a-file"])
def test_bad_tracking_uri_is_a_user_error(in_tmp, uri):
    (in_tmp / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot open an MLflow run"):
        with start_run(uri.format(tmp=in_tmp), "x"):
            pass


def test_metric_log_holds_tensors_until_flush():
    sent = []
    log = MetricLog(sink=sent.extend)
    log.add(1, {"a": torch.tensor(0.5), "b": 2.0})
    log.add(2, {"a": torch.tensor(0.25)})
    assert sent == [] and log.history == {}
    assert log.flush() == {"a": 0.25, "b": 2.0}
    assert [(k, v, s) for k, v, s, _ in sent] == [("a", 0.5, 1), ("b", 2.0, 1), ("a", 0.25, 2)]
    assert log.history == {"a": [(1, 0.5), (2, 0.25)], "b": [(1, 2.0)]}
    assert log.flush() == {}


def test_unknown_models_are_user_errors(tracking_uri, tmp_path):
    with pytest.raises(UserError, match="no run '0123456789abcdef0123456789abcdef' in the store"):
        load_model("runs:/0123456789abcdef0123456789abcdef/model", tracking_uri)
    with pytest.raises(UserError, match="no MLflow model there"):
        load_model(str(tmp_path), tracking_uri)


def test_a_run_records_which_package_supplied_each_plugin(data_dir, tracking_uri, in_tmp):
    run_id, _ = tracked(quick(data_dir, iters=2, probes=("grad-max",)), tracking_uri)
    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    version = importlib.metadata.version("cifarx")
    for kind, name in (("architecture", "table1"), ("augmentation", "crop"),
                       ("augmentation", "normalize"), ("dataset", "cifar10"),
                       ("probe", "grad-max")):
        assert tags[f"cifarx.plugin.{kind}.{name}"] == f"cifarx=={version}"


def test_a_run_with_a_parent_is_its_child(tracking_uri, in_tmp):
    with start_run(tracking_uri, "nested", "parent") as parent:
        pass
    with start_run(tracking_uri, "nested", "child", parent=parent.id) as child:
        pass
    run = MlflowClient(tracking_uri).get_run(child.id)
    assert run.data.tags["mlflow.parentRunId"] == parent.id and child.id != parent.id


def test_a_run_opened_while_another_is_active_is_a_nested_child(tracking_uri, in_tmp):
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("nested")
    with mlflow.start_run() as outer:
        with start_run(tracking_uri, "nested", "inner") as inner:
            assert mlflow.active_run().info.run_id == inner.id
        assert mlflow.active_run().info.run_id == outer.info.run_id  # the caller's run is back
    client = MlflowClient(tracking_uri)
    assert inner.id != outer.info.run_id
    assert client.get_run(inner.id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert client.get_run(inner.id).info.status == "FINISHED"


def test_under_mlflow_run_a_child_run_is_new_not_the_outer_one(tracking_uri, in_tmp,
                                                               monkeypatch):
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name("outer")
    experiment = found.experiment_id if found else client.create_experiment("outer")
    outer = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    with start_run(tracking_uri, "outer", "trial", parent=outer) as child:
        pass
    assert child.id != outer
    assert client.get_run(child.id).data.tags["mlflow.parentRunId"] == outer
    assert client.get_run(outer).info.status == "RUNNING"  # the outer run is mlflow run's to end


def test_experiments_open_on_their_runs_in_the_mlflow_ui(tracking_uri, in_tmp):
    client = MlflowClient(tracking_uri)
    with start_run(tracking_uri, "kind-new", "a"):
        pass
    assert client.get_experiment_by_name("kind-new").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    chosen = client.create_experiment("kind-chosen", tags={"mlflow.experimentKind": "genai"})
    with start_run(tracking_uri, "kind-chosen", "b"):
        pass
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai"  # the user's


def test_float32_metrics_are_logged_as_the_numbers_they_are(tracking_uri, in_tmp):
    from cifarx.tracking.run import as_logged

    assert as_logged(float(torch.tensor(0.46))) == 0.46  # not 0.46000000834465027
    assert as_logged(float(torch.tensor(1.2068575620651245))) == 1.2068576
    assert as_logged(17.499352011000155) == 17.499352011000155  # a double stays as it is
    assert as_logged(0.5) == 0.5 and as_logged(123456789.0) == 123456789.0
    with start_run(tracking_uri, "tests", "float32") as run:
        run.log_points([("acc", float(torch.tensor(0.46)), 1, 0)])
        run.wait()
    assert MlflowClient(tracking_uri).get_run(run.id).data.metrics["acc"] == 0.46


def test_the_logged_model_carries_signature_example_metrics_and_registration(
        data_dir, tracking_uri, in_tmp):
    from mlflow.models import get_model_info

    done = train_run(quick(data_dir, iters=10, eval_every=10),
                     Tracking(tracking_uri, "tests", "registered", register_model="tiny-table1",
                              description="a tiny table1", tags={"team": "vision"}))
    client = MlflowClient(tracking_uri)
    run = client.get_run(done.run_id)
    assert run.data.tags["mlflow.note.content"] == "a tiny table1"
    assert run.data.tags["team"] == "vision"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"cifar10-batch1",
                                                                   "cifar10-test"}
    mlflow.set_tracking_uri(tracking_uri)
    info = get_model_info(f"runs:/{done.run_id}/model")
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 32, 32)}}]
    assert info.saved_input_example_info is not None
    logged = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert logged.name == "model" and logged.tags["cifarx.arch"] == "table1"
    linked = {(m.key, m.dataset_name) for m in logged.metrics}
    assert ("final/test_acc", "cifar10-test") in linked and ("train/loss", None) in linked
    assert run.data.metrics["final/test_acc"] == pytest.approx(done.result.test_acc)
    version = client.get_model_version("tiny-table1", "1")
    assert version.run_id == done.run_id
    model = load_model("models:/tiny-table1/1", tracking_uri)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(pixels), done.result.model.eval()(pixels))


def test_a_training_run_describes_itself_and_samples_system_metrics(data_dir, tracking_uri,
                                                                    in_tmp, monkeypatch):
    # a sample every 50 ms: the run (data, training, figures, model) lasts far longer on any
    # machine, whereas CI once finished it inside a 1 s interval and logged no sample
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    done = train_run(quick(data_dir, iters=40, eval_every=40),
                     Tracking(tracking_uri, "tests", "system"))
    run = MlflowClient(tracking_uri).get_run(done.run_id)
    assert run.data.tags["mlflow.note.content"].startswith("table1 trained on cifar10 (batch1)")
    assert "system/cpu_utilization_percentage" in run.data.metrics
    quiet = train_run(quick(data_dir, iters=40, eval_every=40),
                      Tracking(tracking_uri, "tests", "no-system", system_metrics=False))
    metrics = MlflowClient(tracking_uri).get_run(quiet.run_id).data.metrics
    assert not any(key.startswith("system/") for key in metrics)


def test_cli_tags_and_description_reach_the_run_and_a_bad_tag_opens_none(data_dir,
                                                                          tracking_uri, in_tmp):
    from cifarx.testing import run_cli

    common = ["--data-dir", data_dir, "--iters", "2", "--batch-size", "10", "--eval-every", "2",
              "--device", "cpu", "--threads", "1", "--tracking-uri", tracking_uri,
              "--experiment", "cli-tags"]
    bad = run_cli("train", *common, "--tag", "no-equals-sign")
    assert bad.exit_code == 2
    assert bad.output.strip() == "cifarx: error: --tag no-equals-sign: accepted: KEY=VALUE"
    assert MlflowClient(tracking_uri).get_experiment_by_name("cli-tags") is None
    good = run_cli("train", *common, "--tag", "team=vision", "--tag", "ticket=42",
                   "--description", "smoke test", "--no-system-metrics")
    assert good.exit_code == 0, good.output
    (run,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("cli-tags").experiment_id])
    assert run.data.tags["team"] == "vision" and run.data.tags["ticket"] == "42"
    assert run.data.tags["mlflow.note.content"] == "smoke test"


def test_sigterm_ends_the_run_killed_with_status_143(data_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/term.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "cifarx", "train", "--data-dir", str(data_dir), "--iters",
         "100000", "--batch-size", "10", "--eval-every", "1000", "--device", "cpu",
         "--threads", "1", "--tracking-uri", uri, "--experiment", "term",
         "--no-system-metrics"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:  # wait until training has logged something
            assert process.poll() is None and time.time() < deadline, process.stdout.read()
            try:
                client = MlflowClient(uri)
                found = client.get_experiment_by_name("term")
                runs = client.search_runs([found.experiment_id]) if found else []
                if runs and "train/loss" in runs[0].data.metrics:
                    break
            except Exception:
                pass
            time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        process.kill()
    assert "terminated (SIGTERM)" in process.stdout.read()
    (run,) = MlflowClient(uri).search_runs([found.experiment_id])
    assert run.info.status == "KILLED" and "train/loss" in run.data.metrics


def test_a_dataset_registered_by_another_run_at_the_same_moment_fails_no_run(data_dir, tmp_path,
                                                                            monkeypatch):
    """6 trainings started at once into a new store: one ended FAILED with IntegrityError
    (UNIQUE constraint failed: datasets...) when the others registered the same dataset first.
    The race is simulated: the first insert fails as the loser's did."""
    import mlflow
    from sqlalchemy.exc import IntegrityError

    from cifarx.runs import Tracking, train_run
    from cifarx.training.config import TrainConfig

    real = mlflow.MlflowClient.log_inputs
    raised = []

    def lose_the_race(self, run_id, datasets=None, models=None):
        if not raised:
            raised.append(1)
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint "
                                                    "failed: datasets.experiment_id, name, "
                                                    "digest") from IntegrityError("", {}, None)
        return real(self, run_id, datasets=datasets, models=models)

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", lose_the_race)
    uri = f"sqlite:///{tmp_path}/m.db"
    done = train_run(TrainConfig(data_dir=str(data_dir), iters=2, batch_size=10, device="cpu",
                                 threads=1), Tracking(uri, "race"))
    run = mlflow.MlflowClient(uri).get_run(done.run_id)
    assert raised and run.info.status == "FINISHED"
    assert {d.dataset.name for d in run.inputs.dataset_inputs}


def test_a_full_disk_while_the_model_is_saved_ends_the_run_failed_in_one_line(data_dir,
                                                                              tmp_path,
                                                                              monkeypatch):
    """It was a chained traceback and a run left RUNNING for good. The full disk is simulated:
    the weights file cannot be written (ENOSPC), and the first attempt to end the run fails
    as a write to a full disk does."""
    import errno

    import mlflow
    from typer.testing import CliRunner

    from cifarx.cli import app
    from cifarx.tracking import run as tracking, weights

    def full(model, recipe, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "weights.safetensors"))

    real_end, ends = tracking.Run.end, []

    def end_once_failing(self, status):
        ends.append(status)
        if len(ends) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_end(self, status)

    monkeypatch.setattr(weights, "save", full)
    monkeypatch.setattr(tracking.Run, "end", end_once_failing)
    uri = f"sqlite:///{tmp_path}/m.db"
    result = CliRunner().invoke(app, ["train", "--iters", "2", "--batch-size", "10", "--threads",
                                      "1", "--data-dir", str(data_dir), "--tracking-uri", uri])
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("cifarx:")]
    assert line.startswith("cifarx: error: the disk is full (writing ") and \
        "weights.safetensors" in line and "ended FAILED" in line
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    assert run.info.status == "FAILED" and ends == ["FAILED", "FAILED"]
    assert "No space left on device" in run.data.tags["cifarx.error"]
