"""Transfer learning (issue 20 item 3): --init-from a trained model, --freeze, --lr-backbone.
Frozen parameters do not change over steps; the head is found in cifarx's and timm's nets;
bad input is one line before any run."""

import mlflow
import pytest
import torch
from torch import nn

from cifarx import UserError
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
