"""What the MLflow UI shows of cifarx's runs (issue 21): short trial names, a sweep's saved
view of its trials and its best configuration linked from its description, a model's
description in the Registry, attack and analyze runs linked to their source run with the test
set as their input, and `cifarx ui` serving the artifacts of runs logged through a server."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifarx.runs import AnalyzeConfig, AttackConfig, Tracking, analyze_run, attack_run, train_run
from cifarx.studies.configurations import configurations
from cifarx.studies.study import load
from cifarx.studies.sweep_plan import param_of, run_namer, trial_run_name
from cifarx.testing import run_cli
from cifarx.training.config import TrainConfig, plan

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]+)\]\(#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning\)")


def quick(data_dir, **overrides):
    return TrainConfig(**{**dict(data_dir=str(data_dir), iters=10, batch_size=20, eval_every=10,
                                 device="cpu", threads=1), **overrides})


# --- trial names ------------------------------------------------------------------------------


def test_trial_run_names_are_short_axis_values_with_the_seed_last():
    values = {"aug": ["normalize,flip,crop", "normalize,flip,crop,mixup",
                      "normalize,flip,crop,cutmix"], "lr": [0.1, 0.05]}
    assert trial_run_name({"aug": "normalize,flip,crop,mixup", "lr": 0.05}, 1, values) == \
        "aug=+mixup lr=0.05 s1"
    assert trial_run_name({"aug": "normalize,flip,crop", "lr": 0.1}, 0, values) == \
        "aug=normalize,flip,crop lr=0.1 s0"
    # an option's last part names it (in its usual short form), unless two axes end alike
    assert trial_run_name({"arch-opt.activation": "silu", "weight-decay": 5e-4}, 2) == \
        "act=silu wd=0.0005 s2"
    assert trial_run_name({"arch-opt.p": 0.1, "aug-opt.flip.p": 0.5}, 0) == \
        "arch-opt.p=0.1 aug-opt.flip.p=0.5 s0"
    # a drawn number keeps 3 digits, a grid value its own (8/255 as a fraction)
    assert trial_run_name({"lr": 0.012345678, "eps": 8 / 255}, 3, {"eps": [8 / 255]}) == \
        "lr=0.0123 eps=8/255 s3"
    assert trial_run_name({"lr": 0.1}, None) == "lr=0.1"


@pytest.mark.parametrize("study", sorted((ROOT / "studies").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_shipped_study_names_its_trials_apart_within_the_name_column(study):
    loaded = load(study)
    name = run_namer(loaded)
    names = [name(point.axes, seed) for point in configurations(loaded) for seed in loaded.seeds]
    assert len(set(names)) == len(names), names
    # MLflow's Run Name column is 190 px wide, about 30 characters; the sweep's view widens it
    # for the many-axis studies (defaults, optimizers: optimizer, lr, momentum, ...)
    if len({k for p in configurations(loaded) for k in p.axes}) <= 2:
        assert max(map(len, names)) <= 30, max(names, key=len)


def test_axes_with_one_value_in_every_configuration_are_left_out_of_the_names():
    from cifarx.studies.study import from_dict

    study = from_dict({"seeds": 2, "configurations": [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
        {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9},
        {"optimizer": "adam", "lr": 1e-3}]})
    name = run_namer(study)
    assert [name(p.axes, 1) for p in configurations(study)] == [
        "opt=sgd lr=0.05 mom=0.9 s1", "opt=adam lr=0.001 mom=0.9 s1", "opt=adam lr=0.001 s1"]
    fixed = from_dict({"grid": {"lr": [0.1], "aug": ["flip", "crop"]}})
    assert [run_namer(fixed)(p.axes, 0) for p in configurations(fixed)] == ["aug=flip s0",
                                                                            "aug=crop s0"]


def test_each_axis_names_the_param_its_trials_log():
    params = plan(TrainConfig(device="cpu", aug_options=("crop.pad=2",))).params()
    for axis in ("lr", "eval-every", "weight-decay", "arch-opt.activation", "aug-opt.crop.pad",
                 "train-split", "probe", "label-smoothing"):
        assert param_of(axis) in params, axis


# --- a sweep ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(data_dir, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('ui-sweep')}/mlflow.db"
    result = run_cli("sweep", "--set", "iters=4", "--set", "batch-size=10", "--set",
                     "eval-every=2", "--set", "device=cpu", "--set", "threads=1", "--set",
                     f"data-dir={data_dir}", "--grid", "lr=0.05,0.1", "--grid", "aug=flip",
                     "--grid", "aug=flip,crop", "--seeds", "2", "--workers", "1",
                     "--tracking-uri", uri, "--experiment", "ui", "--register-model", "ui-best")
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ui")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cifarx.sweep") == "true"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, experiment, parent, trials


def test_trials_carry_short_names_that_tell_them_apart(swept):
    _, _, _, trials = swept
    names = sorted(r.info.run_name for r in trials)
    assert names == sorted(f"lr={lr} aug={a} s{s}" for a in ("flip", "+crop")
                           for lr in ("0.05", "0.1") for s in (0, 1))


def test_the_sweeps_description_links_its_best_configuration_and_its_trials(swept):
    client, experiment, parent, trials = swept
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Study ui: 8 trials, grid search over lr, aug")
    ((label, exp, best_run),) = LINK.findall(note)
    best = client.get_run(best_run)
    assert exp == experiment.experiment_id and best.data.tags["mlflow.parentRunId"] == \
        parent.info.run_id
    assert label == best.info.run_name.rsplit(" ", 1)[0]  # the configuration, without its seed
    mean = parent.data.metrics["best/final/test_acc_mean"]
    seeds = [r.data.metrics["final/test_acc"] for r in trials
             if r.info.run_name.rsplit(" ", 1)[0] == label]
    assert mean == pytest.approx(sum(seeds) / len(seeds))
    assert f"final/test_acc mean {mean:.4g} over 2 seed(s)" in note
    assert best.data.metrics["final/test_acc"] == max(seeds)  # the best seed's run
    view = f"#/experiments/{exp}/runs?viewStateShareKey=cifarx-{parent.info.run_id}" \
        "&workflowType=machine_learning"
    assert f"[all trials, best first]({view})" in note


def test_the_trials_view_lists_the_trials_best_first_with_their_axes(swept):
    client, experiment, parent, trials = swept
    tags = client.get_experiment(experiment.experiment_id).tags
    saved = json.loads(tags[f"mlflow.sharedViewState.cifarx-{parent.info.run_id}"])
    assert {"name", "createdAt", "updatedAt", "state"} <= set(saved)  # the UI's envelope
    state = json.loads(saved["state"])
    found = client.search_runs([experiment.experiment_id], state["searchFilter"])
    assert {r.info.run_id for r in found} == {r.info.run_id for r in trials}
    assert state["orderByKey"] == "metrics.`final/test_acc`" and state["orderByAsc"] is False
    assert state["selectedColumns"] == ["params.`lr`", "params.`aug`", "params.`seed`",
                                        "metrics.`final/test_acc`"]
    for column in state["selectedColumns"]:  # each names what the trials logged
        kind, key = re.fullmatch(r"(params|metrics)\.`(.+)`", column).groups()
        assert all(key in getattr(r.data, kind) for r in trials), column
    assert state["columnOrder"][0] == "attributes.`Run Name`"
    sweeps = json.loads(json.loads(tags["mlflow.sharedViewState.cifarx-sweeps"])["state"])
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id],
                                                      sweeps["searchFilter"])] == \
        [parent.info.run_id]
    assert "metrics.`best/final/test_acc_mean`" in sweeps["selectedColumns"]


def test_the_sweeps_registered_model_version_has_the_models_description(swept):
    client, _, parent, _ = swept
    version = client.get_model_version("ui-best", "1")
    assert version.description.startswith("table1 trained on cifar10 (batch1)")
    assert "pixels in [0, 1]" in version.description


# --- a training, its attack and its analysis --------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_dir, tracking_uri):
    return train_run(quick(data_dir), Tracking(tracking_uri, "ui-train", "trained",
                                               register_model="ui-table1",
                                               system_metrics=False))


def test_timings_are_a_table_not_single_point_charts(trained, tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(trained.run_id).data.metrics
    assert {k for k in metrics if k.startswith("final/")} == {"final/test_acc",
                                                               "final/test_loss"}
    final = json.loads(Path(client.download_artifacts(trained.run_id, "final.json", tmp_path))
                       .read_text())
    assert final["final/train_seconds"] == pytest.approx(trained.result.seconds)
    assert final["final/images_per_second"] == pytest.approx(trained.result.images_per_second)
    assert final["iterations"] == 10


def test_the_model_and_its_registered_version_say_what_they_are(trained, tracking_uri):
    client = MlflowClient(tracking_uri)
    run = client.get_run(trained.run_id)
    logged = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    note = logged.tags["mlflow.note.content"]
    assert note.startswith("table1 trained on cifar10 (batch1) with flip,normalize,crop")
    assert "float32 N x 3 x 32 x 32, pixels in [0, 1]" in note
    assert "N x 10 logits, one per class: airplane, automobile, bird," in note
    assert f"**Test accuracy** {trained.result.test_acc:.2%}" in note
    assert trained.registered == ("ui-table1", "1")
    assert client.get_model_version("ui-table1", "1").description == note
    assert client.get_registered_model("ui-table1").description == note


def test_train_prints_the_registered_versions_page(data_dir, tracking_uri):
    result = run_cli("train", "--data-dir", data_dir, "--iters", "2", "--batch-size", "10",
                     "--eval-every", "2", "--device", "cpu", "--threads", "1", "--tracking-uri",
                     tracking_uri, "--experiment", "ui-cli", "--register-model", "ui-cli",
                     "--no-system-metrics")
    assert result.exit_code == 0, result.output
    assert "registered as ui-cli version 1: http://127.0.0.1:5000/#/models/ui-cli/versions/1" \
        "?workflowType=machine_learning" in result.output


def assert_linked_with_the_test_set(run, source, client):
    ((label, experiment, run_id),) = LINK.findall(run.data.tags["mlflow.note.content"])
    assert (experiment, run_id) == (source.info.experiment_id, source.info.run_id)
    assert label == source.info.run_name
    (used,) = run.inputs.dataset_inputs
    (tested,) = [i for i in source.inputs.dataset_inputs
                 if i.tags[0].value == "test"]
    assert used.tags[0].value == "test"
    assert (used.dataset.name, used.dataset.digest) == (tested.dataset.name,
                                                        tested.dataset.digest)


def test_an_attack_run_links_its_source_run_and_logs_the_test_set(trained, data_dir,
                                                                  tracking_uri):
    done = attack_run(AttackConfig(f"runs:/{trained.run_id}/model", "fgsm", count=4,
                                   data_dir=str(data_dir), device="cpu"),
                      Tracking(tracking_uri, "ui-train", system_metrics=False))
    client = MlflowClient(tracking_uri)
    assert_linked_with_the_test_set(client.get_run(done.run_id),
                                    client.get_run(trained.run_id), client)


def test_an_analysis_of_a_registered_model_links_its_source_run(trained, data_dir,
                                                                 tracking_uri):
    done = analyze_run(AnalyzeConfig("models:/ui-table1/1", ("confusion-matrix",),
                                     data_dir=str(data_dir), device="cpu"),
                       Tracking(tracking_uri, "ui-train", system_metrics=False))
    client = MlflowClient(tracking_uri)
    run = client.get_run(done.run_id)
    assert run.data.tags["cifarx.source_run"] == trained.run_id
    assert_linked_with_the_test_set(run, client.get_run(trained.run_id), client)


# --- cifarx ui on a tracking server's database ------------------------------------------------


def server_store(folder: Path) -> tuple[str, str, Path]:
    """A store as `mlflow server` leaves it: a run whose artifacts are mlflow-artifacts:/ URIs,
    stored in ``folder/mlartifacts``. (uri, run id, the artifact file)."""
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("served", artifact_location="mlflow-artifacts:/1")
    run = client.create_run(experiment)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = folder / "mlartifacts" / run.info.artifact_uri[len("mlflow-artifacts:/"):] / \
        "notes.txt"
    stored.parent.mkdir(parents=True)
    stored.write_text("logged through a server")
    return uri, run.info.run_id, stored


def listed_artifacts(uri: str, run_id: str, cwd: Path, *args) -> tuple[list[str], str]:
    """Start `cifarx ui` and ask it for the run's artifacts, as its Artifacts tab does."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cifarx", "ui", "--port", str(port),
                               "--tracking-uri", uri, *args], cwd=cwd,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/artifacts/list?"
                        f"run_uuid={run_id}", timeout=2) as r:
                    files = [f["path"] for f in json.load(r).get("files", [])]
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the UI did not answer within 90 s"
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    return files, out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_on_a_servers_database_shows_the_artifacts_beside_it(tmp_path):
    uri, run_id, _ = server_store(tmp_path / "server")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    files, out = listed_artifacts(uri, run_id, elsewhere)
    assert files == ["notes.txt"], out
    assert f"artifacts of the 1 run(s) logged through a tracking server: " \
           f"{tmp_path / 'server' / 'mlartifacts'}" in out


def test_ui_takes_artifacts_destination_and_warns_without_it(tmp_path):
    uri, run_id, stored = server_store(tmp_path / "server")
    moved = tmp_path / "moved"
    (tmp_path / "server" / "mlartifacts").rename(moved)
    files, out = listed_artifacts(uri, run_id, tmp_path, "--artifacts-destination", str(moved))
    assert files == ["notes.txt"], out
    files, out = listed_artifacts(uri, run_id, tmp_path)
    assert files == [], out
    assert "cifarx: warning: 1 run(s) in this store keep their artifacts where the tracking " \
           "server they were logged through stored them" in out
