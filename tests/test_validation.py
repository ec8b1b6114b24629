"""--val-split, --early-stop, --monitor and --keep: the split, the stopping rule, the weights
kept and logged, the sweep's use of val/ metrics, and the bad inputs."""

import math

import pytest
import torch
from mlflow import MlflowClient

from cifarx import UserError, hookimpl
from cifarx.inference import predict as inference
from cifarx.plugin_api.types import Executor
from cifarx.testing import run_cli
from cifarx.tracking.models import load_model
from cifarx.training.config import TrainConfig, plan
from cifarx.training.loop import EarlyStop, assemble, train
from cifarx.training.validation import Selection, holdout_count, stratified_split


def quick(data_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), iters=30, batch_size=20, eval_every=10, device="cpu",
                    threads=1, precision="fp32")
    return TrainConfig(**{**settings, **overrides})


# --- the split ------------------------------------------------------------------------------

def test_split_is_disjoint_stratified_and_fixed_by_the_seed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]
    train_idx, val_idx = stratified_split(labels, 10, seed=0)
    assert len(val_idx) == 10 and len(train_idx) == 90
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(100))
    assert labels[val_idx].bincount().tolist() == [5, 3, 2]  # each class's share
    again, other = stratified_split(labels, 10, seed=0)[1], stratified_split(labels, 10, seed=1)[1]
    assert torch.equal(again, val_idx) and not torch.equal(other, val_idx)


def test_split_gives_the_rounding_remainder_to_the_largest_fractions():
    labels = torch.tensor([0] * 3 + [1] * 3 + [2] * 4)  # 5 of 10: quotas 1.5, 1.5, 2
    _, val_idx = stratified_split(labels, 5, seed=0)
    assert labels[val_idx].bincount().tolist() == [2, 1, 2]
    _, val_idx = stratified_split(labels, 7, seed=0)  # quotas 2.1, 2.1, 2.8
    assert labels[val_idx].bincount().tolist() == [2, 2, 3]


def test_holdout_count_takes_a_count_or_a_fraction():
    assert holdout_count(5000, 10000) == 5000
    assert holdout_count(0.1, 10000) == 1000
    assert holdout_count(0.25, 10) == 3  # 2.5 rounds half up
    with pytest.raises(UserError, match="holds out none"):
        holdout_count(0.001, 100)
    with pytest.raises(UserError, match="leaving none to train on"):
        holdout_count(100, 100)


def test_the_run_trains_on_the_rest_and_normalizes_by_it(data_dir):
    p = plan(quick(data_dir, val_split=0.25))
    data = p.load_data()  # batch1 of the synthetic set: 200 images, 20 per class
    setup = assemble(p, data)
    split = setup.split
    assert len(split.val_images) == 50 and len(split.train_images) == 150
    assert split.val_labels.bincount().tolist() == [5] * 10
    # every image is in exactly one part
    rows = lambda images: {bytes(i.flatten().numpy()) for i in images}  # noqa: E731
    assert rows(split.val_images).isdisjoint(rows(split.train_images))
    assert rows(split.val_images) | rows(split.train_images) == rows(data.train_images)
    assert torch.equal(assemble(p, data).split.val_labels, split.val_labels)  # the seed fixes it
    assert not torch.equal(assemble(plan(quick(data_dir, val_split=0.25, seed=1)), data)
                           .split.val_images, split.val_images)
    pixels = split.train_images.double() / 255  # the held-out images inform no statistic
    assert torch.allclose(setup.model.normalize.mean.flatten().double(),
                          pixels.mean((0, 2, 3)), atol=1e-6)
    assert p.params()["val_split"] == 0.25 and plan(quick(data_dir, val_split=50.0)) \
        .config.val_split == 50  # a count stays a whole number


# --- the stopping rule ----------------------------------------------------------------------

@pytest.mark.parametrize("metric, values, patience, stops_after, best", [
    ("val/acc", [0.1, 0.3, 0.2, 0.3, 0.25, 0.4], 2, 4, 2),  # a tie is no improvement
    ("val/acc", [0.1, 0.2, 0.3, 0.4], 1, None, 4),
    ("val/acc", [0.5, 0.4, 0.6, 0.5, 0.4, 0.3], 3, 6, 3),
    ("val/loss", [2.0, 1.5, 1.6, 1.4, 1.45, 1.41, 1.5], 3, 7, 4),  # losses minimize
    ("val/acc", [math.nan, 0.1, math.nan, math.nan], 2, 4, 2),  # NaN never improves
])
def test_selection_stops_where_the_scripted_metric_says(metric, values, patience, stops_after,
                                                         best):
    selection = Selection(metric, patience)
    stopped = None
    for evaluation, value in enumerate(values, 1):
        improved = selection.update(evaluation * 10, value)
        assert improved == (selection.best_step == evaluation * 10)
        if selection.exhausted:
            stopped = evaluation
            break
    assert stopped == stops_after
    assert selection.best_step == best * 10 and selection.best_value == values[best - 1]


def test_without_patience_selection_only_tracks_the_best():
    selection = Selection("test/loss")
    for step, value in enumerate([3.0, 1.0, 2.0, 2.0, 2.0, 2.0], 1):
        selection.update(step, value)
    assert not selection.exhausted and (selection.best_step, selection.best_value) == (2, 1.0)


# --- the loop, with a scripted validation metric ----------------------------------------------

# The best at the 2nd evaluation: patience 3 stops at the 5th.
VAL_ACC = [0.2, 0.5, 0.4, 0.45, 0.5, 0.3, 0.9]


@pytest.fixture
def scripted(monkeypatch):
    """inference.evaluate on the validation images returns VAL_ACC in turn; on the test set it
    measures as usual. Records the model's weights at each evaluation."""
    real = inference.evaluate
    seen = {"weights": [], "calls": 0}

    def evaluate(model, images, labels, device, precision="auto", tta="none"):
        loss, acc, predictions = real(model, images, labels, device, precision)
        if len(images) == 200:  # the synthetic test set
            seen["weights"].append({k: v.clone() for k, v in model.state_dict().items()})
            return loss, acc, predictions
        value = VAL_ACC[seen["calls"]]
        seen["calls"] += 1
        return torch.tensor(1 - value), torch.tensor(value), predictions

    monkeypatch.setattr(inference, "evaluate", evaluate)
    return seen


def test_early_stop_ends_where_patience_runs_out_and_keeps_the_best(data_dir, scripted):
    p = plan(quick(data_dir, iters=100, eval_every=10, val_split=50, early_stop=3))
    assert p.config.keep == "best"
    result = train(p, p.load_data())
    assert isinstance(result.stopped, EarlyStop) and result.steps == 50
    assert [v for _, v in result.history["val/acc"]] == pytest.approx(VAL_ACC[:5])
    assert result.best == (20, pytest.approx(0.5))
    assert result.test_acc == dict(result.history["test/acc"])[20]
    assert result.test_loss == dict(result.history["test/loss"])[20]
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in scripted["weights"][1].items())
    assert not all(torch.equal(kept[k], v) for k, v in scripted["weights"][-1].items())


def test_keep_last_keeps_the_last_weights(data_dir, scripted):
    p = plan(quick(data_dir, iters=40, eval_every=10, val_split=50, keep="last"))
    result = train(p, p.load_data())
    assert result.stopped is None and result.steps == 40 and result.best == (20, 0.5)
    assert result.test_acc == result.history["test/acc"][-1][1]
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in scripted["weights"][-1].items())


class Inline:
    @hookimpl
    def register_executors(self, register):
        def run(trials, on_outcome):
            from cifarx.studies.trials import run_trial
            for trial in trials:
                on_outcome(run_trial(trial))
        register(Executor(name="inline-test", run=run, summary="every trial in this process"))


def test_the_logged_model_and_final_metrics_are_the_best_evaluations(data_dir, tracking_uri,
                                                                     scripted):
    result = run_cli("train", "--data-dir", data_dir, "--iters", "100", "--batch-size", "20",
                     "--eval-every", "10", "--device", "cpu", "--threads", "1", "--precision",
                     "fp32", "--val-split", "50", "--early-stop", "3", "--tracking-uri",
                     tracking_uri, "--experiment", "early-stop")
    assert result.exit_code == 0, result.output
    assert "early stop: val/acc did not improve for 3 evaluations after iteration 20" in \
        result.stdout
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("early-stop").experiment_id])
    metrics, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["cifarx.stopped_at"] == "50"
    assert (params["val_split"], params["val_images"], params["early_stop"], params["monitor"],
            params["keep"]) == ("50", "50", "3", "val/acc", "best")
    assert metrics["best/step"] == 20 and metrics["best/val/acc"] == pytest.approx(0.5)
    test_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/acc")}
    assert sorted(test_acc) == [10, 20, 30, 40, 50]
    assert metrics["final/test_acc"] == pytest.approx(test_acc[20])
    model = load_model(f"runs:/{run.info.run_id}/model", tracking_uri, torch.device("cpu"))
    data = plan(quick(data_dir)).load_data()
    _, acc, _ = inference.evaluate(model, data.test_images, data.test_labels,
                                   torch.device("cpu"), "fp32")
    assert float(acc) == pytest.approx(test_acc[20])


def test_a_sweep_ranks_by_val_acc_and_an_early_stop_is_a_finished_trial(data_dir,
                                                                         tracking_uri):
    uri = tracking_uri
    result = run_cli("sweep", "--grid", "lr=0.05,0.1", "--metric", "val/acc", "--set",
                     "val-split=0.2", "--set", "early-stop=1", "--set", "iters=30", "--set",
                     "eval-every=5", "--set", "batch-size=20", "--set", "device=cpu", "--set",
                     "threads=1", "--set", f"data-dir={data_dir}", "--executor", "inline-test",
                     "--tracking-uri", uri, "--experiment", "val-sweep", plugins=[Inline()])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("val-sweep").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all("val/acc" in r.data.metrics and r.data.params["val_split"] == "0.2"
               for r in children)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    best = max(r.data.metrics["val/acc"] for r in children)
    assert parent.data.metrics["best/val/acc_mean"] == pytest.approx(best)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["--early-stop", "3"], ["--early-stop follows --monitor val/acc", "add --val-split N"]),
    (["--keep", "best"], ["--keep best follows --monitor val/acc", "add --val-split"]),
    (["--early-stop", "3", "--monitor", "val/loss"], ["--monitor val/loss", "--val-split"]),
    (["--val-split", "20", "--monitor", "train/acc"],
     ["unknown --monitor 'train/acc'", "accepted: val/acc, val/loss, test/acc, test/loss"]),
    (["--val-split", "20", "--keep", "worst"], ["unknown --keep 'worst'", "accepted: best, last"]),
    (["--val-split", "0"], ["--val-split must be", "a fraction in (0, 1), got 0"]),
    (["--val-split", "12.5"], ["--val-split must be", "got 12.5"]),
    (["--val-split", "200"], ["holds out 200 of the 200 training images"]),
    (["--val-split", "190"], ["--batch-size 20 is larger than the 10 training images left"]),
    (["--val-split", "20", "--early-stop", "0"], ["--early-stop must be at least 1"]),
])
def test_bad_selection_input_is_one_line_and_opens_no_run(data_dir, in_tmp, args, fragments):
    result = run_cli("train", "--data-dir", data_dir, "--batch-size", "20", "--device", "cpu",
                     *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (in_tmp / "mlflow.db").exists()


def test_monitoring_a_test_metric_warns_that_it_leaks(data_dir, tracking_uri):
    result = run_cli("train", "--data-dir", data_dir, "--iters", "4", "--batch-size", "20",
                     "--eval-every", "2", "--device", "cpu", "--threads", "1", "--early-stop",
                     "5", "--monitor", "test/loss", "--tracking-uri", tracking_uri)
    assert result.exit_code == 0, result.output
    assert "cifarx: warning: --monitor test/loss selects the model on the test set" in \
        result.stderr
    assert "best test/loss" in result.stdout
