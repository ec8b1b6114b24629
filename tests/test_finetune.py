"""Transfer learning (issue 20 item 3): --init-from a trained model, --freeze, --lr-backbone.
Frozen parameters do not change over steps; the head is found in cifarx's and timm's nets;
bad input is one line before any run."""

import mlflow
import pytest
import torch
from torch import nn

from cifarx import UserError
from cifarx.runs import Tracking
from cifarx.testing import run_cli
from cifarx.training import finetune
from cifarx.training.config import TrainConfig, plan
from cifarx.training.loop import assemble, train

from test_regularizers import Small  # a conv, a BatchNorm and a linear head


@pytest.fixture
def small(register_plugin):
    register_plugin(Small(), "small")


def config(data_dir, **changes):
    return TrainConfig(**{"arch": "small", "aug": (), "data_dir": str(data_dir), "iters": 3,
                          "batch_size": 50, "eval_every": 3, "optimizer": "sgd", "lr": 0.5,
                          "weight_decay": 5e-4, "schedule": "none", "device": "cpu",
                          "threads": 1, "precision": "fp32", **changes})


def trained(cfg):
    p = plan(cfg)
    data = p.load_data()
    setup = assemble(p, data)
    net = setup.model.net
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    train(p, data, setup)
    return before, {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_frozen_parameters_and_their_batchnorm_do_not_change(small, data_dir):
    before, after = trained(config(data_dir, freeze=("backbone",)))
    # the head (the last layer with parameters) trained; everything else is as it was,
    # BatchNorm's running statistics included (weight decay would move a frozen weight too)
    assert not torch.equal(before["4.weight"], after["4.weight"])
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(before[key], after[key]), key
    before, after = trained(config(data_dir, freeze=("0.*",)))  # a glob: the conv only
    assert torch.equal(before["0.weight"], after["0.weight"])
    assert not torch.equal(before["1.weight"], after["1.weight"])


def test_lr_backbone_gives_the_backbone_its_own_rate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 10))
    groups = finetune.param_groups(model, 0.1, 0.001)
    assert [g["lr"] for g in groups] == [0.1, 0.001]
    assert [len(g["params"]) for g in groups] == [2, 2]  # head weight+bias; conv weight+bias
    assert groups[0]["params"][0] is model[3].weight
    assert len(finetune.param_groups(model, 0.1, None)) == 1


def test_the_head_of_a_timm_model_is_its_classifier():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert finetune.head_names(net) == {"fc.weight", "fc.bias"}
    frozen = finetune.apply(net, ("backbone",))
    assert "fc.weight" not in frozen and "conv1.weight" in frozen
    counts = finetune.counts(net)
    assert counts["trainable_parameters"] == 512 * 10 + 10 < counts["parameters"]


def test_init_from_a_trained_model_then_another_number_of_classes(small, data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli("train", "--arch", "small", "--aug", "", "--data-dir", str(data_dir),
                     "--iters", "3", "--batch-size", "50", "--eval-every", "3", "--threads",
                     "1", "--tracking-uri", uri, plugins=[Small()])
    assert result.exit_code == 0, result.stderr
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("cifarx").experiment_id])
    model_uri = f"runs:/{run.info.run_id}/model"
    from cifarx.tracking.models import load_model

    theirs = load_model(model_uri, uri).net.state_dict()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    done = finetune.init_from(net, model_uri, uri)
    assert set(done["loaded"]) == set(theirs) and done["skipped"] == []
    assert all(torch.equal(net.state_dict()[k], theirs[k]) for k in theirs)
    # 100 classes: every tensor but the head's is loaded; the head keeps its initialization
    other = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 100))
    done = finetune.init_from(other, model_uri, uri)
    assert sorted(done["skipped"]) == ["4.bias", "4.weight"]
    assert torch.equal(other[0].weight, theirs["0.weight"])
    with pytest.raises(UserError, match="none of its weights fit"):
        finetune.init_from(nn.Sequential(nn.Linear(3, 2)), model_uri, uri)
    # through the CLI: a feature-extraction run from it logs what trains
    result = run_cli("train", "--arch", "small", "--aug", "", "--data-dir", str(data_dir),
                     "--iters", "3", "--batch-size", "50", "--eval-every", "3", "--threads",
                     "1", "--tracking-uri", uri, "--init-from", model_uri, "--freeze",
                     "backbone", "--lr-backbone", "0.01", plugins=[Small()])
    assert result.exit_code == 0, result.stderr
    client = mlflow.MlflowClient(uri)
    newest = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    params = newest.data.params
    assert (params["init_from"], params["freeze"], params["lr_backbone"]) == \
        (model_uri, "backbone", "0.01")
    assert int(params["trainable_parameters"]) == 4 * 8 * 8 * 10 + 10
    assert int(params["parameters"]) > int(params["trainable_parameters"])


@pytest.mark.parametrize("flags, message", [
    (["--freeze", "conv9*"], "--freeze conv9*: no parameter matches; the network's are "
                             "0.weight, 0.bias"),
    (["--freeze", "backbone,4.*"], "freezes every parameter: nothing would train"),
    (["--lr-backbone", "-1"], "--lr-backbone must be >= 0"),
    (["--init-from", "runs:/0123456789abcdef0123456789abcdef/model"], "--init-from runs:/"),
    (["--classes", "lion,cat"], "--classes: no class 'lion'; accepted: airplane, automobile"),
    (["--classes", "cat"], "--classes: name at least two classes, got 1"),
])
def test_bad_transfer_flags_are_one_line_and_open_no_run(small, data_dir, tmp_path, flags,
                                                         message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_cli("train", "--arch", "small", "--aug", "", "--data-dir", str(data_dir),
                     "--iters", "3", "--tracking-uri", uri, *flags, plugins=[Small()])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name("cifarx")
    assert found is None or not client.search_runs([found.experiment_id])


def test_only_classes_keeps_their_images_relabelled_in_order():
    from cifarx import ImageData
    from cifarx.training.data import only_classes

    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    data = ImageData(images, labels, images[:4], labels[:4], ("a", "b", "c", "d"), "here")
    task = only_classes(data, ("d", "1"))  # a name and a number; the order given is the labels'
    assert task.classes == ("d", "b")
    assert task.train_images[:, 0, 0, 0].tolist() == [1, 3, 5, 7]
    assert task.train_labels.tolist() == [1, 0, 1, 0]
    assert task.test_labels.tolist() == [1, 0] and task.source == "here"
    with pytest.raises(UserError, match=r"--classes: no class 'e'; accepted: a, b, c, d \(or "
                                        r"their numbers 0-3\)"):
        only_classes(data, ("a", "e"))
    with pytest.raises(UserError, match="at least two classes, got 1"):
        only_classes(data, ("a", "0"))


def test_commands_test_a_model_of_some_classes_on_their_images():
    from cifarx import ImageData
    from cifarx.runs import model_classes

    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = ImageData(images, labels, images, labels, ("a", "b", "c"), "here")
    two = nn.Linear(1, 2)
    two.classes = ("c", "a")
    classes, theirs = model_classes(two, data)
    assert classes == ("c", "a") and theirs.test_labels.tolist() == [1, 0, 1, 0]
    assert model_classes(nn.Linear(1, 3), data)[1] is data  # no classes named: the dataset's
    two.classes = ("x", "y")  # not the dataset's: refused, not guessed
    with pytest.raises(UserError, match="the model predicts 2 classes, the dataset has 3"):
        model_classes(two, data)


def test_a_model_of_some_classes_is_trained_tested_and_transferred(small, data_dir, tmp_path):
    """--classes: the run trains and tests on those classes only; commands that test the
    model use those classes' test images; --init-from it onto other classes is a transfer
    (with another number of classes the head starts fresh)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ("--arch", "small", "--aug", "", "--data-dir", str(data_dir), "--iters", "3",
              "--batch-size", "20", "--eval-every", "3", "--threads", "1", "--tracking-uri", uri)
    result = run_cli("train", *common, "--classes", "cat,dog,3", plugins=[Small()])
    assert result.exit_code == 0, result.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    assert run.data.params["classes"] == "cat,dog"  # 3 is cat: named once
    from cifarx.tracking.models import load_model

    model_uri = f"runs:/{run.info.run_id}/model"
    assert load_model(model_uri, uri).classes == ("cat", "dog")
    assert run.data.metrics["final/test_acc"] >= 0
    from cifarx.runs.evaluate import EvaluateConfig, evaluate_run

    report = evaluate_run(EvaluateConfig(model_uri, data_dir=str(data_dir), device="cpu"),
                          Tracking(uri=uri)).report
    assert report.classes == ("cat", "dog")
    assert report.matrix.sum() == 40  # the synthetic test split's 20 cats and 20 dogs
    result = run_cli("train", *common, "--classes", "airplane,automobile,ship",
                     "--init-from", model_uri, "--freeze", "backbone", plugins=[Small()])
    assert result.exit_code == 0, result.stderr
    newest = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0]
    assert newest.data.params["classes"] == "airplane,automobile,ship"
    assert int(newest.data.params["trainable_parameters"]) == 4 * 8 * 8 * 3 + 3  # a fresh head
