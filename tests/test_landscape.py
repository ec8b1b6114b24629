"""The loss-landscape and hessian analyses: curvature on a quadratic with a known Hessian,
filter normalization on a toy net, the landscape's centre is the model's loss, bad options."""

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cifarx import AnalysisData
from cifarx.cli import app
from cifarx.plugins.landscape import (filter_normalized, hessian, hutchinson_trace, hvp,
                                      loss_landscape, mean_loss, top_eigenvalues)

CLASSES = tuple("abcdefghij")


def quadratic(eigenvalues, seed=0):
    """loss(w) = w'Aw / 2 with A = Q diag(eigenvalues) Q': its Hessian is A everywhere."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g,
                                       dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    w = torch.randn(len(eigenvalues), generator=g, dtype=torch.float64, requires_grad=True)
    return a, w, lambda: 0.5 * w @ a @ w


def test_power_iteration_finds_the_known_eigenvalues_of_a_quadratic():
    a, w, loss = quadratic([9.0, -4.0, 2.0, 1.0, 0.5])
    product = hvp(loss, [w])
    assert torch.allclose(product([torch.ones(5, dtype=torch.float64)])[0],
                          a @ torch.ones(5, dtype=torch.float64))
    values, traces = top_eigenvalues(product, [w], k=2, iters=500, tol=1e-10,
                                     generator=torch.Generator().manual_seed(1))
    assert values == pytest.approx([9.0, -4.0], rel=1e-4)  # largest magnitudes, in order
    assert traces[0][-1] == pytest.approx(9.0, rel=1e-4)


def test_hutchinson_trace_of_a_known_hessian():
    _, w, loss = quadratic([3.0, 1.0, 0.25])
    diagonal = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64, requires_grad=True)
    exact, _ = hutchinson_trace(hvp(lambda: 0.5 * (diagonal ** 2 * torch.tensor(
        [3.0, 1.0, 0.25], dtype=torch.float64)).sum(), [diagonal]), [diagonal], samples=3)
    assert exact == pytest.approx(4.25)  # a diagonal Hessian: z'Hz is the trace for every z
    mean, error = hutchinson_trace(hvp(loss, [w]), [w], samples=400,
                                   generator=torch.Generator().manual_seed(0))
    assert abs(mean - 4.25) < 4 * error and error < 0.5


def toy_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_directions_are_normalized_filter_by_filter():
    net = toy_net()
    params = list(net.parameters())
    direction = filter_normalized(params, torch.Generator().manual_seed(0))
    for p, d in zip(params, direction):
        if p.dim() <= 1:  # biases and BatchNorm: no direction (Li et al.)
            assert torch.count_nonzero(d) == 0
        else:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1),
                                  rtol=1e-5)
            assert not torch.allclose(d, p.detach())


def toy_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=g)
    labels = torch.arange(n) % 10
    return AnalysisData(images=images, labels=labels, indices=torch.arange(n), classes=CLASSES,
                        test_images=(images * 255).byte(), test_labels=labels, seed=seed)


def test_the_landscape_centre_is_the_models_loss_and_the_model_is_left_alone():
    net = toy_net().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in net.parameters()]
    data = toy_data()
    found = loss_landscape(net, data, grid=5, span=0.5, dims=2, images=40)
    x = data.test_images.float() / 255
    with torch.no_grad():
        expected = nn.functional.cross_entropy(net(x), data.test_labels).item()
    assert found.metrics["analysis/landscape_center_loss"] == pytest.approx(expected, rel=1e-5)
    grid = found.files["landscape/landscape.json"]["loss"]
    assert grid[2][2] == pytest.approx(expected, rel=1e-5)  # the middle of the grid: the model
    assert found.metrics["analysis/landscape_rise"] >= 0
    assert 0 <= found.metrics["analysis/landscape_nonconvex_share"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    line = loss_landscape(net, data, grid=7, span=0.5, dims=1, images=40)
    assert line.files["landscape/landscape.json"]["loss"][3] == pytest.approx(expected, rel=1e-5)
    assert found.figure is not None and line.figure is not None


def test_hessian_analysis_on_a_toy_net():
    net = toy_net().eval()
    found = hessian(net, toy_data(), top=2, iters=30, samples=5, images=40)
    eig1, eig2 = found.metrics["analysis/hessian_eig_1"], found.metrics["analysis/hessian_eig_2"]
    assert abs(eig1) >= abs(eig2) * 0.99 and math.isfinite(found.metrics["analysis/hessian_trace"])
    assert found.metrics["analysis/hessian_top_eig"] == eig1


def test_mean_loss_batches_like_one_pass():
    net = toy_net().eval()
    x, y = torch.rand(7, 3, 8, 8), torch.arange(7)
    with torch.no_grad():
        assert mean_loss(net, x, y).item() == pytest.approx(
            nn.functional.cross_entropy(net(x), y).item(), rel=1e-6)


@pytest.mark.parametrize("option,words", [("loss-landscape.grid=2", "grid"),
                                          ("loss-landscape.dims=3", "dims"),
                                          ("hessian.top=0", "top")])
def test_bad_options_are_one_line_and_open_no_run(option, words, tmp_path):
    name = option.split(".")[0]
    result = CliRunner().invoke(app, ["analyze", "--model", str(tmp_path / "none"),
                                      "--analysis", name, "--analysis-opt", option,
                                      "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error:") and words in lines[0]
