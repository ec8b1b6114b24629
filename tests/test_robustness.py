"""The autoattack attack (ART's APGD and Square) and `cifarx attack --robust-accuracy`
(issue 20 item 4): a model that ignores its input keeps its clean accuracy at every radius;
a linear model is fooled within the ball; the curve is logged; bad input is one line."""

import json

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from cifarx.runs import Tracking, train_run
from cifarx.training.config import TrainConfig

from test_cli import cli

pytest.importorskip("art")


class Blind(nn.Module):
    """Logits that do not depend on the image: no attack can change its answer."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(10, dtype=torch.float32))

    def forward(self, x):
        return self.bias.expand(len(x), 10) + 0 * x.flatten(1)[:, :1]


def test_autoattack_fools_within_eps_and_cannot_fool_a_blind_model():
    from cifarx.plugins.autoattack import build_autoattack

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    for p in linear.parameters():
        p.requires_grad_(False)
    x = torch.rand(12, 3, 8, 8)
    y = linear(x).argmax(1)
    eps = 8 / 255
    result = build_autoattack(linear, eps=eps, iters=10, queries=20)(
        x, y, torch.Generator().manual_seed(0))
    assert (result.images - x).abs().amax() <= eps + 1e-6
    fooled = linear(result.images).argmax(1) != y
    assert torch.equal(fooled, result.success) and fooled.float().mean() > 0.5
    blind = Blind().eval()
    labels = torch.full((12,), 9)  # its answer: right on every image
    result = build_autoattack(blind, eps=eps, iters=5, queries=10)(
        x, labels, torch.Generator().manual_seed(0))
    assert not result.success.any() and torch.equal(result.images, x)
    # only the stages asked for run, in order; an unknown stage is named
    from cifarx import OptionError

    with pytest.raises(OptionError, match="'fab' is not one of apgd-ce, apgd-dlr, square"):
        build_autoattack(linear, attacks="apgd-ce,fab")


@pytest.fixture(scope="module")
def model(data_dir, tracking_uri):
    config = TrainConfig(data_dir=str(data_dir), aug=("normalize",), iters=20, batch_size=20,
                         eval_every=1000, device="cpu", threads=1)
    return train_run(config, Tracking(tracking_uri, "robust", "tiny")).model_uri


def test_robust_accuracy_curve_is_logged_and_never_above_the_clean_one(model, data_dir,
                                                                       tracking_uri, tmp_path):
    result = cli("attack", "--model", model, "--robust-accuracy", "--eps", "8/255,0,2/255",
                 "--count", "40", "--attack-opt", "iters=5", "--attack-opt", "queries=20",
                 "--data-dir", data_dir, "--device", "cpu", "--threads", "1",
                 "--tracking-uri", tracking_uri, "--experiment", "robust")
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("robust").experiment_id],
                             filter_string="params.robust_accuracy = 'true'")[0]
    assert run.data.params["attack"] == "autoattack"  # the default for robust accuracy
    assert run.data.params["attack.eps"] == "0,2/255,8/255"  # in increasing order
    history = [m.value for m in client.get_metric_history(run.info.run_id, "robust/acc")]
    clean = run.data.metrics["robust/clean_acc"]
    assert history[0] == clean and all(a >= b for a, b in zip(history, history[1:]))
    curve = json.load(open(client.download_artifacts(run.info.run_id, "robust/curve.json",
                                                     str(tmp_path))))
    assert [c["text"] for c in curve["curve"]] == ["0", "2/255", "8/255"]
    assert curve["images"] == 40
    assert "figures/robust_accuracy.png" in {a.path for a in client.list_artifacts(
        run.info.run_id, "figures")}


@pytest.mark.parametrize("flags, message", [
    (["--attack", "ifgsm"], "ifgsm went beyond eps=2/255 (its eps is not a radius)"),
    (["--eps", "2/255,x"], "--eps x: accepted: radii in [0, 1]"),
    (["--per-class", "2"], "--robust-accuracy takes the first --count test images"),
    (["--attack-opt", "attacks=fab"], "'fab' is not one of"),
])
def test_bad_robust_accuracy_input_is_one_line(model, data_dir, tracking_uri, flags, message):
    args = ["attack", "--model", model, "--robust-accuracy", "--count", "4", "--data-dir",
            data_dir, "--device", "cpu", "--tracking-uri", tracking_uri, "--experiment",
            "robust-bad"]
    if "--eps" not in flags:
        args += ["--eps", "2/255"]
    result = cli(*args, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name("robust-bad")
    assert found is None or not client.search_runs([found.experiment_id])
