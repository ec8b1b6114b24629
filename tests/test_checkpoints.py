"""Checkpoints and resume: a run interrupted and resumed ends where an uninterrupted one does."""

import pytest
import torch
from mlflow import MlflowClient

from cifarx import UserError
from cifarx.runs import CHECKPOINT, Tracking, resume_run, train_run
from cifarx.training.config import TrainConfig


def config(data_dir, **changes):
    return TrainConfig(**{**dict(data_dir=str(data_dir), iters=30, batch_size=10, eval_every=5,
                                 device="cpu", threads=1, precision="fp32", aug="flip,crop",
                                 checkpoint_every=10), **changes})


def interrupt_at(step):
    def listen(points):
        if any(s >= step for _, _, s, _ in points):
            raise KeyboardInterrupt  # as a kill would, after the checkpoint at step 20
    return listen


@pytest.mark.parametrize("experiment, extra", [
    ("ckpt", {}),
    # the weight average and the alternating flip's epoch are part of the state too
    ("ckpt-ema", {"ema": 0.9, "aug_options": ("flip.alternate=true",)}),
])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(data_dir, tracking_uri,
                                                                    experiment, extra):
    whole = train_run(config(data_dir, **extra), Tracking(tracking_uri, experiment, "whole",
                                                          system_metrics=False))
    tracking = Tracking(tracking_uri, experiment, "cut", system_metrics=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(config(data_dir, **extra), tracking, [interrupt_at(25)])
    client = MlflowClient(tracking_uri)
    (cut,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                filter_string="attributes.run_name = 'cut'")
    assert cut.info.status == "KILLED"
    assert CHECKPOINT in {a.path for a in client.list_artifacts(cut.info.run_id, "checkpoints")}

    done = resume_run(cut.info.run_id, Tracking(tracking_uri, system_metrics=False))
    assert done.run_id == cut.info.run_id
    assert done.result.test_acc == whole.result.test_acc
    assert done.result.test_loss == whole.result.test_loss
    for (name, a), b in zip(whole.result.model.state_dict().items(),
                            done.result.model.state_dict().values()):
        assert torch.equal(a, b), name
    run = client.get_run(cut.info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cut"
    for key in ("test/acc", "train/loss"):  # a step logged twice has the resumed value last
        resumed = {m.step: m.value for m in client.get_metric_history(cut.info.run_id, key)}
        assert resumed == {m.step: m.value for m in client.get_metric_history(whole.run_id, key)}
    assert run.data.metrics["final/test_acc"] == pytest.approx(whole.result.test_acc)


def test_resume_refuses_what_it_cannot_continue(data_dir, tracking_uri):
    done = train_run(config(data_dir, iters=4, eval_every=2, checkpoint_every=0),
                     Tracking(tracking_uri, "ckpt", "plain", system_metrics=False))
    with pytest.raises(UserError, match="the run finished"):
        resume_run(done.run_id, Tracking(tracking_uri))
    with pytest.raises(UserError, match="no such run"):
        resume_run("0123456789abcdef", Tracking(tracking_uri))
    tracking = Tracking(tracking_uri, "ckpt", "no-checkpoint", system_metrics=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(config(data_dir, checkpoint_every=0), tracking, [interrupt_at(5)])
    client = MlflowClient(tracking_uri)
    (cut,) = client.search_runs([client.get_experiment_by_name("ckpt").experiment_id],
                                filter_string="attributes.run_name = 'no-checkpoint'")
    with pytest.raises(UserError, match="--checkpoint-every N"):
        resume_run(cut.info.run_id, Tracking(tracking_uri))


def start(data_dir, uri, name):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "cifarx", "train", "--data-dir", str(data_dir), "--iters", "400",
         "--batch-size", "10", "--eval-every", "50", "--device", "cpu", "--threads", "1",
         "--precision", "fp32", "--checkpoint-every", "20", "--tracking-uri", uri,
         "--experiment", "kill", "--run-name", name, "--no-system-metrics"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(process, uri, name):
    import time

    deadline = time.time() + 120
    while True:
        assert process.poll() is None and time.time() < deadline, process.stdout.read()
        try:
            client = MlflowClient(uri)
            (run,) = client.search_runs(
                [client.get_experiment_by_name("kill").experiment_id],
                filter_string=f"attributes.run_name = '{name}'")
            if CHECKPOINT in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                     "checkpoints")}:
                return run.info.run_id
        except (ValueError, AttributeError, Exception):
            pass
        time.sleep(0.5)


@pytest.mark.parametrize("signal_name, status", [("SIGKILL", "RUNNING"), ("SIGTERM", "KILLED")])
def test_a_killed_or_terminated_cli_run_resumes_to_the_same_end(data_dir, tmp_path, signal_name,
                                                                status):
    import signal

    from cifarx.testing import run_cli

    uri = f"sqlite:///{tmp_path}/kill.db"
    process = start(data_dir, uri, "cut")
    try:
        run_id = wait_for_checkpoint(process, uri, "cut")
        process.send_signal(getattr(signal, signal_name))
        code = process.wait(timeout=60)
    finally:
        process.kill()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == status  # SIGKILL leaves it RUNNING
    if signal_name == "SIGTERM":
        assert code == 143 and "terminated (SIGTERM)" in process.stdout.read()
    resumed = run_cli("train", "--resume", run_id, "--tracking-uri", uri, "--no-system-metrics")
    assert resumed.exit_code == 0, resumed.output
    whole = run_cli("train", "--data-dir", data_dir, "--iters", "400", "--batch-size", "10",
                    "--eval-every", "50", "--device", "cpu", "--threads", "1", "--precision",
                    "fp32", "--tracking-uri", uri, "--experiment", "kill", "--run-name", "whole",
                    "--no-system-metrics")
    assert whole.exit_code == 0, whole.output
    (full,) = client.search_runs([client.get_experiment_by_name("kill").experiment_id],
                                 filter_string="attributes.run_name = 'whole'")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("final/test_acc", "final/test_loss", "train/loss"):
        assert run.data.metrics[key] == full.data.metrics[key], key
