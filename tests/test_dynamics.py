"""The grad-flow, activations and update-ratio probes against values computed by hand, and in
a real training run."""

import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from typer.testing import CliRunner

from cifarx.cli import app
from cifarx.plugins.dynamics import attach_activations, attach_grad_flow, attach_update_ratio


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def step(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_grad_flow_reads_every_layer_on_its_steps():
    model, x, y = net(), torch.rand(5, 3, 8, 8), torch.arange(5)
    read = attach_grad_flow(model, stride=3)
    step(model, x, y)
    first = read()
    assert set(first) == {f"grad_flow/{s}/{n}" for s in ("norm", "max") for n in ("0", "2", "5")}
    assert first["grad_flow/norm/0"] == pytest.approx(model[0].weight.grad.norm().item())
    assert first["grad_flow/max/5"] == pytest.approx(model[5].weight.grad.abs().max().item())
    assert read() == {}  # step 2
    assert read() != {}  # step 3: every stride


def test_activations_count_dead_units_in_training_forwards_only():
    model, x = net(), torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second conv's units never fire: all dead
    read = attach_activations(model, stride=2)
    model.eval()
    model(x)  # an evaluation: not recorded
    model.train()
    model(x)
    found = read()
    assert found["activations/dead/3"] == 1.0
    relu1 = torch.relu(model[0](x)).detach()
    expected_dead = (relu1.transpose(0, 1).flatten(1).amax(1) <= 0).float().mean()
    assert found["activations/dead/1"] == pytest.approx(expected_dead.item())
    assert found["activations/mean/1"] == pytest.approx(relu1.mean().item())
    assert found["activations/std/1"] == pytest.approx(relu1.std().item(), rel=1e-5)
    model(x)
    assert read() != {}  # step 2: every stride
    model(x)
    assert read() == {}  # step 3: its forward recorded nothing

def test_update_ratio_is_the_step_the_optimizer_took():
    model, x, y = net(), torch.rand(5, 3, 8, 8), torch.arange(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    read = attach_update_ratio(model, stride=1)
    step(model, x, y)
    assert read() == {}  # nothing to compare yet; the weights are kept
    grads = {n: model[int(n)].weight.grad.clone() for n in ("0", "2", "5")}
    weights = {n: model[int(n)].weight.detach().clone() for n in grads}
    optimizer.step()
    step(model, x, y)
    found = read()
    for n in grads:  # plain SGD: the update is lr * grad
        assert found[f"update_ratio/{n}"] == pytest.approx(
            (0.05 * grads[n].norm() / weights[n].norm()).item(), rel=1e-4)


def test_the_probes_in_a_training_run(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(app, [
        "train", "--arch", "table1", "--iters", "6", "--batch-size", "10", "--eval-every", "3",
        "--threads", "1", "--data-dir", str(data_dir), "--tracking-uri", uri,
        "--probe", "grad-flow,activations,update-ratio", "--probe-opt", "grad-flow.stride=2",
        "--probe-opt", "activations.stride=2", "--probe-opt", "update-ratio.stride=2"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    keys = set(run.data.metrics)
    assert {"grad_flow/norm/conv1", "activations/dead/act1", "update_ratio/conv1"} <= keys, keys
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "grad_flow/norm/conv1")]
    assert steps == [1, 2, 4, 6]
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/grad-flow.png", "figures/activations.png",
            "figures/update-ratio.png"} <= figures


def test_activation_maps_show_each_layer_and_count_dead_filters():
    """Two of a conv's four filters can never be positive (a large negative bias): half of
    its channels are dead, whatever the image (issue 20: 004's activation maps)."""
    from cifarx import AnalysisData, OptionError
    from cifarx.plugins.dynamics import activation_maps, check_activation_maps

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    with torch.no_grad():
        net[0].weight.mul_(0.1)
        net[0].bias.copy_(torch.tensor([0.0, 0.0, -100.0, -100.0]))
    images = torch.rand(20, 3, 8, 8)
    labels = torch.arange(20) % 10
    data = AnalysisData(images=images, labels=labels, indices=torch.arange(20),
                        classes=tuple("abcdefghij"), test_images=(images * 255).byte(),
                        test_labels=labels)
    found = activation_maps(net.eval(), data, images=2, channels=4)
    assert found.resolved == {"layers": "0,2"}  # the first and the last conv (one is both)
    assert found.metrics["analysis/activation_maps/dead/0"] == 0.5
    maps = found.files["activation_maps/maps.pt"]
    assert maps["0"].shape == (2, 4, 8, 8) and maps["2"].shape == (2, 4, 8, 8)
    with torch.no_grad():
        expected = net[0](images[[0, 1]])
    assert torch.allclose(maps["0"], expected)
    assert found.figure is not None and "0 2/4 dead" in found.summary
    relu = activation_maps(net, data, layers="1", images=1, channels=2)
    assert relu.metrics["analysis/activation_maps/dead/1"] == 0.5
    with pytest.raises(OptionError, match="no module 'conv9'"):
        check_activation_maps(net, data, layers="conv9")
    with pytest.raises(OptionError, match="does not output feature maps"):
        check_activation_maps(net, data, layers="6")
