"""Analyses: each attribution against a direct computation, Grad-CAM on a toy task where the
answer is known, the randomization test, the runner, and the commands (train --analyze,
analyze, evaluate, --adversarial), with their one-line errors."""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from cifarx import AnalysisData, OptionError
from cifarx.inference.analysis import choose, plan
from cifarx.plugin_api.registry import catalog
from cifarx.plugins.analyses import (grad_cam_maps, guided_backprop_maps,
                                     integrated_gradients_maps, randomized_copies,
                                     saliency_maps, sanity_check, spearman)
from cifarx.testing import run_cli
from cifarx.training.model import Classifier

CLASSES = ("red", "green", "blue")


def tiny(activation=lambda: nn.ReLU(inplace=True), seed=0) -> Classifier:
    """Two convs and a linear head on 8x8 images; in-place ReLUs, as the built-in nets have."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), act1=activation(),
        conv2=nn.Conv2d(4, 6, 3, padding=1), act2=activation(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(6, 3)))
    return Classifier(nn.Identity(), net, CLASSES).eval()


def inputs(n=5, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 3


def input_gradient(forward, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(forward(x).gather(1, y[:, None]).sum(), x)
    return grad


# --- each attribution against a direct computation ----------------------------------------

def test_saliency_is_the_max_over_channels_of_the_gradient_magnitude():
    model, (x, y) = tiny(), inputs()
    expected = input_gradient(model, x, y).abs().amax(1)
    found = saliency_maps(copy.deepcopy(model), x.clone().requires_grad_(), y)
    assert torch.allclose(found, expected, atol=1e-6)


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes a gradient only where both it and the input are positive."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


def test_guided_backprop_matches_a_hand_written_guided_relu():
    model, (x, y) = tiny(), inputs()
    net = model.net

    def guided(z):
        h = GuidedReLU.apply(net.conv1(z))
        h = GuidedReLU.apply(net.conv2(h))
        return net.fc(h.mean((2, 3)))

    expected = input_gradient(guided, x, y).abs().amax(1)
    found = guided_backprop_maps(copy.deepcopy(model).apply(_not_in_place), x.clone(), y)
    assert torch.allclose(found, expected, atol=1e-6)
    plain = input_gradient(model, x, y).abs().amax(1)
    assert not torch.allclose(found, plain, atol=1e-4)  # it is not the plain gradient


def _not_in_place(module):
    if getattr(module, "inplace", False):
        module.inplace = False


def test_grad_cam_weighs_the_last_conv_by_its_mean_gradient_and_upsamples():
    model, (x, y) = tiny(activation=nn.ReLU), inputs(size=8)  # in place, act2 would change A
    seen = {}
    hook = model.net.conv2.register_forward_hook(lambda m, a, out: seen.update(a=out))
    logits = model(x)
    hook.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), seen["a"])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * seen["a"]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(grad_cam_maps(copy.deepcopy(model), x.clone(), y), expected.detach(),
                          atol=1e-6)
    # a named layer: conv1's maps, not conv2's
    assert not torch.allclose(grad_cam_maps(model, x.clone(), y, layer="conv1"), expected,
                              atol=1e-4)


def test_integrated_gradients_against_a_fine_riemann_sum_and_completeness():
    model, (x, y) = tiny(activation=nn.Tanh), inputs()  # smooth: quadrature converges fast
    steps = 400  # the midpoint rule on the straight path from black, every point at once
    along = (torch.arange(steps) + 0.5).div(steps)[:, None, None, None, None] * x
    grads = input_gradient(model, along.flatten(0, 1), y.repeat(steps)).unflatten(0, (steps, -1))
    expected = (x * grads.mean(0)).sum(1)
    found = integrated_gradients_maps(model, x.clone(), y, steps=50)
    assert torch.allclose(found, expected, atol=1e-4 * expected.abs().max())
    with torch.no_grad():
        gain = (model(x) - model(torch.zeros_like(x))).gather(1, y[:, None])[:, 0]
    assert torch.allclose(found.sum((1, 2)), gain, rtol=1e-3, atol=1e-5)
    gray = integrated_gradients_maps(model, x.clone(), y, steps=50, baseline="gray")
    with torch.no_grad():
        gain = (model(x) - model(torch.full_like(x, 0.5))).gather(1, y[:, None])[:, 0]
    assert torch.allclose(gray.sum((1, 2)), gain, rtol=1e-3, atol=1e-5)


def test_spearman_matches_scipy_and_gives_0_for_a_constant_map():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 6, 6, generator=g), torch.rand(4, 6, 6, generator=g)
    b[0] = a[0] ** 3  # same order
    b[1] = (b[1] * 4).round()  # ties
    found = spearman(a, b)
    for i in range(4):
        assert found[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0],
                                                abs=1e-6)
    assert found[0].item() == pytest.approx(1.0)
    assert spearman(a[:1], torch.zeros(1, 6, 6)).item() == 0.0


# --- Grad-CAM on a task whose answer is known ----------------------------------------------

def squares(n: int, size: int = 16, side: int = 4, seed: int = 0):
    """Grey noise with one pure red, green or blue square at a random place: the class is the
    colour. Returns images, labels and each square's top-left corner."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g).expand(n, 3, size, size).clone()
    labels = torch.randint(0, 3, (n,), generator=g)
    corners = torch.randint(0, size - side + 1, (n, 2), generator=g)
    for i in range(n):
        (r, c), colour = corners[i].tolist(), torch.zeros(3)
        colour[labels[i]] = 1
        images[i, :, r:r + side, c:c + side] = colour[:, None, None]
    return images, labels, corners


@pytest.fixture(scope="module")
def square_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: a second thread only waits on a busy machine
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), act1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(8, 8, 3, padding=1), act2=nn.ReLU(inplace=True),
        conv3=nn.Conv2d(8, 8, 3, padding=1), act3=nn.ReLU(inplace=True),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 3)))
    model = Classifier(nn.Identity(), net, CLASSES)
    images, labels, _ = squares(1024, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(100):  # a few seconds
        batch = torch.randint(0, len(images), (32,))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def test_grad_cam_peaks_inside_the_coloured_square(square_model):
    images, labels, corners = squares(100, seed=2)
    with torch.no_grad():
        assert (square_model(images).argmax(1) == labels).float().mean() > 0.95
    maps = grad_cam_maps(copy.deepcopy(square_model).apply(_not_in_place), images, labels)
    peaks = maps.flatten(1).argmax(1)
    rows, cols = peaks // 16, peaks % 16
    inside = ((rows >= corners[:, 0]) & (rows < corners[:, 0] + 4) & (cols >= corners[:, 1])
              & (cols < corners[:, 1] + 4))
    assert inside.float().mean() >= 0.9, inside.float().mean()


# --- the randomization test ---------------------------------------------------------------

def toy_data(images, labels, seed=0) -> AnalysisData:
    return AnalysisData(images=images, labels=labels, indices=torch.arange(len(labels)),
                        classes=CLASSES, test_images=(images * 255).byte(), test_labels=labels,
                        seed=seed)


def test_randomization_correlates_identical_models_fully_and_random_ones_little(square_model):
    images, labels, _ = squares(30, seed=3)
    model = copy.deepcopy(square_model).apply(_not_in_place)
    trained = grad_cam_maps(model, images, labels)
    same = grad_cam_maps(copy.deepcopy(model), images, labels)
    assert torch.allclose(spearman(trained, same), torch.ones(30))

    layers = [name for name, _ in randomized_copies(model)]
    assert layers == ["fc", "conv3", "conv2", "conv1"]  # from the top down
    assert torch.equal(grad_cam_maps(model, images, labels), trained)  # the model is untouched
    metrics, figure = sanity_check("grad-cam", grad_cam_maps, model, toy_data(images, labels),
                                   trained, {})
    assert set(metrics) == {f"analysis/grad-cam/sanity/{n}" for n in layers} | {
        "analysis/grad-cam/sanity_spearman", "analysis/grad-cam/sanity_passed",
        "analysis/grad-cam/sanity_constant"}
    assert metrics["analysis/grad-cam/sanity_spearman"] < 0.5
    assert metrics["analysis/grad-cam/sanity_passed"] == 1.0
    assert figure is not None


def test_a_deep_cascade_is_compared_at_a_few_points_the_last_always():
    """The sanity test of a 26-layer net (residual) costs 6 passes of the method, not 26."""
    from cifarx.plugins.analyses import SANITY_POINTS, checkpoints

    assert checkpoints(4) == {0, 1, 2, 3}
    points = checkpoints(26)
    assert len(points) == SANITY_POINTS == 6 and {0, 25} <= points
    assert sorted(points) == [0, 5, 10, 15, 20, 25]


def test_integrated_gradients_sanity_compares_maps_of_sanity_steps(square_model, monkeypatch):
    """Both the trained and the randomized maps of the test use sanity_steps points."""
    from cifarx.plugins import analyses

    images, labels, _ = squares(8, seed=4)
    model = copy.deepcopy(square_model).apply(_not_in_place)
    seen = []
    real = analyses.integrated_gradients_maps

    def counting(model, images, targets, steps=50, baseline="black", sanity_steps=16):
        seen.append(steps)
        return real(model, images, targets, steps, baseline, sanity_steps)

    trained = real(model, images, labels, steps=50)
    metrics, _ = sanity_check("integrated-gradients", counting, model, toy_data(images, labels),
                              trained, {"steps": 50, "baseline": "black", "sanity_steps": 8})
    assert seen and set(seen) == {8}  # the trained maps again, then each checkpoint's
    assert len(seen) == 1 + 4
    assert {f"analysis/integrated-gradients/sanity/{n}" for n in ("fc", "conv3", "conv2",
                                                                    "conv1")} <= set(metrics)


# --- the runner -----------------------------------------------------------------------------

def test_choose_takes_as_many_of_each_class_as_it_can_by_seed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    chosen = choose(labels, 12, seed=0)
    assert labels[chosen].tolist() == [0] * 5 + [1] * 4 + [2] * 3  # class 2 has only 3
    assert len(set(chosen.tolist())) == 12
    assert torch.equal(chosen, choose(labels, 12, seed=0))
    assert not torch.equal(chosen, choose(labels, 12, seed=1))
    assert labels[choose(labels, 7, seed=0)].tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_plan_checks_names_options_and_images():
    found = catalog()
    chosen = plan(found, ["grad-cam", "embedding"], ["grad-cam.layer=conv1", "embedding.k=3"])
    assert chosen.options["grad-cam"] == {"layer": "conv1", "sanity": False}
    assert chosen.params()["analysis.embedding.k"] == "3"
    with pytest.raises(Exception, match="unknown analysis 'nope'; available: activation-maps, calibration"):
        plan(found, ["nope"])
    with pytest.raises(Exception, match="--analysis-opt embedding.k=0: not accepted"):
        plan(found, ["embedding"], ["embedding.k=0"])
    with pytest.raises(Exception, match="--images must be at least 1"):
        plan(found, ["errors"], images=0)
    with pytest.raises(Exception, match="--adversarial: errors does not look at adversarial"):
        plan(found, ["saliency", "errors"], adversarial=True)


def test_grad_cam_check_lists_the_conv_layers():
    found = catalog().get("analysis", "grad-cam")
    images, labels = inputs()
    with pytest.raises(OptionError, match="no module 'conv9'; its conv layers: conv1, conv2"):
        found.check(tiny(), toy_data(images, labels), layer="conv9")
    with pytest.raises(OptionError, match="fc outputs .* not feature maps"):
        found.check(tiny(), toy_data(images, labels), layer="fc")


# --- the commands ---------------------------------------------------------------------------

def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


QUICK = ["--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A table1 trained briefly with --analyze, in a store of its own: (uri, run)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('analyses')}/mlflow.db"
    done = run_cli("train", "--data-dir", str(data_dir), "--iters", "20", "--batch-size", "20",
                   "--eval-every", "10", *QUICK, "--tracking-uri", uri, "--experiment", "train",
                   "--analyze", "grad-cam,calibration", "--analysis-opt", "grad-cam.layer=conv2")
    assert done.exit_code == 0, done.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    return uri, run


def test_train_analyze_logs_into_the_training_run(trained, tmp_path):
    uri, run = trained
    client = MlflowClient(uri)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/training.png", "figures/grad-cam.png", "figures/calibration.png"} <= figures
    assert "analysis/ece" in run.data.metrics and "analysis/grad-cam/seconds" in run.data.metrics
    assert run.data.params["analyses"] == "grad-cam,calibration"
    assert run.data.params["analysis.grad-cam.layer"] == "conv2"
    assert run.data.tags["cifarx.plugin.analysis.grad-cam"].startswith("cifarx")
    path = client.download_artifacts(run.info.run_id, "attributions/grad-cam.pt", str(tmp_path))
    saved = torch.load(path, weights_only=True)
    assert saved["maps"].dtype == torch.float32 and saved["maps"].shape == (100, 32, 32)
    assert saved["indices"].dtype == torch.int64 and saved["labels"].dtype == torch.int64
    assert saved["labels"].bincount().tolist() == [10] * 10


@pytest.mark.parametrize("args, fragments", [
    (["--analyze", "grad-cam,nope"], ["unknown analysis 'nope'", "available: ", "grad-cam"]),
    (["--analyze", "grad-cam", "--analysis-opt", "grad-cam.layer=conv9"],
     ["--analysis-opt grad-cam.layer=conv9", "no module 'conv9'", "conv1, conv2, conv3"]),
    (["--analyze", "grad-cam", "--analysis-opt", "saliency.sanity=true"],
     ["'saliency' is not among the plugins the run uses"]),
])
def test_train_analyze_refuses_bad_input_before_the_run_opens(data_dir, in_tmp, args,
                                                             fragments):
    one_line_error(run_cli("train", "--data-dir", str(data_dir), "--iters", "5", *QUICK, *args),
                   *fragments)
    assert not (in_tmp / "mlflow.db").exists()


def test_analyze_every_builtin_then_evaluate(trained, data_dir, tmp_path):
    uri, run = trained
    model = f"runs:/{run.info.run_id}/model"
    names = sorted(catalog().names("analysis"))
    done = run_cli("analyze", "--model", model, "--analysis", ",".join(names), "--images", "12",
                   "--analysis-opt", "integrated-gradients.steps=4", "--analysis-opt",
                   "saliency.sanity=true", "--data-dir", str(data_dir), *QUICK,
                   "--tracking-uri", uri, "--experiment", "analyze")
    assert done.exit_code == 0, done.output
    client = MlflowClient(uri)
    (analysis,) = client.search_runs([client.get_experiment_by_name("analyze").experiment_id])
    assert analysis.data.tags["cifarx.source_run"] == run.info.run_id
    assert analysis.data.params["images"] == "12" and analysis.data.params["dataset"] == "cifar10"
    figures = {a.path for a in client.list_artifacts(analysis.info.run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in names} | {"figures/saliency-sanity.png"}
    metrics = analysis.data.metrics
    assert metrics["test/acc"] == pytest.approx(run.data.metrics["final/test_acc"], abs=0.02)
    assert 0 <= metrics["analysis/ece"] <= 1 and 0 <= metrics["analysis/knn_acc"] <= 1
    assert "analysis/saliency/sanity/conv1" in metrics and "analysis/f1/cat" in metrics
    for name in names:
        assert f"{name} (" in done.stdout and f"analysis/{name}/seconds" in metrics

    evaluated = run_cli("evaluate", "--model", model, "--data-dir", str(data_dir), *QUICK,
                        "--tracking-uri", uri, "--experiment", "evaluate")
    assert evaluated.exit_code == 0, evaluated.output
    assert "per-class test accuracy" in evaluated.stdout
    (evaluation,) = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert [a.path for a in client.list_artifacts(evaluation.info.run_id, "figures")] == \
        ["figures/confusion-matrix.png"]
    assert evaluation.data.metrics["test/acc"] == pytest.approx(
        run.data.metrics["final/test_acc"])  # the same precision as training's evaluation


def test_analyze_adversarial_maps_pairs(trained, data_dir, tmp_path):
    uri, run = trained
    attacked = run_cli("attack", "--model", f"runs:/{run.info.run_id}/model", "--count", "10",
                       "--data-dir", str(data_dir), *QUICK, "--tracking-uri", uri,
                       "--experiment", "attack")
    assert attacked.exit_code == 0, attacked.output
    client = MlflowClient(uri)
    (attack,) = client.search_runs([client.get_experiment_by_name("attack").experiment_id])
    done = run_cli("analyze", "--adversarial", attack.info.run_id, "--analysis", "grad-cam",
                   "--data-dir", str(data_dir), *QUICK, "--tracking-uri", uri,
                   "--experiment", "adversarial")
    assert done.exit_code == 0, done.output
    (analysis,) = client.search_runs([client.get_experiment_by_name("adversarial").experiment_id])
    assert analysis.data.params["model"] == f"runs:/{run.info.run_id}/model"  # the set's model
    assert analysis.data.params["images"] == "10"
    assert -1 <= analysis.data.metrics["analysis/grad-cam/adv_spearman"] <= 1
    path = client.download_artifacts(analysis.info.run_id, "attributions/grad-cam.pt",
                                     str(tmp_path))
    saved = torch.load(path, weights_only=True)
    assert saved["maps"].shape == saved["adv_maps"].shape == (10, 32, 32)
    assert set(saved) == {"maps", "indices", "labels", "adv_maps", "adv_labels", "adv_pred_maps"}

    one_line_error(run_cli("analyze", "--adversarial", attack.info.run_id, "--analysis",
                           "grad-cam,calibration", "--data-dir", str(data_dir), *QUICK,
                           "--tracking-uri", uri),
                   "--adversarial: calibration does not look at adversarial images")


def test_analyze_bad_input_is_one_line_and_opens_no_run(trained, data_dir, tmp_path):
    uri, run = trained
    model = f"runs:/{run.info.run_id}/model"
    common = ["--data-dir", str(data_dir), *QUICK, "--tracking-uri", uri,
              "--experiment", "refused"]
    cases = [
        (["--model", model, "--analysis", "saliency,nope"], ["unknown analysis 'nope'"]),
        (["--model", model, "--analysis", "grad-cam", "--analysis-opt", "grad-cam.depth=3"],
         ["grad-cam has no option 'depth'; accepted: layer, sanity"]),
        (["--model", model, "--analysis", "grad-cam", "--analysis-opt", "grad-cam.layer=conv9"],
         ["no module 'conv9'; its conv layers: conv1, conv2, conv3"]),
        (["--model", model, "--analysis", "saliency", "--images", "0"],
         ["--images must be at least 1, got 0"]),
        (["--model", model, "--analysis", "saliency", "--images", "5000"],
         ["--images 5000: the test split has 200 images"]),
        (["--model", "runs:/0123456789abcdef0123456789abcdef/model", "--analysis", "saliency"],
         ["no run", "set --tracking-uri"]),
        (["--model", str(tmp_path), "--analysis", "saliency"], ["no MLflow model there"]),
        (["--analysis", "saliency"], ["--model: name the model to analyze"]),
        (["--model", model, "--analysis", "embedding", "--images", "3"],
         ["k-NN with k=5 needs more than 5 images"]),
    ]
    for args, fragments in cases:
        one_line_error(run_cli("analyze", *args, *common), *fragments)
    assert MlflowClient(uri).get_experiment_by_name("refused") is None


def test_describe_lists_an_analysis_options():
    done = run_cli("describe", "analysis", "grad-cam")
    assert done.exit_code == 0, done.output
    assert "--analysis-opt grad-cam.NAME=VALUE" in done.stdout and "sanity" in done.stdout


def test_every_option_an_analysis_used_is_a_param_with_unset_ones_as_resolved(data_dir,
                                                                              tmp_path):
    """An analyze run with grad-cam did not say which layer it used (an unset option was left
    out of the params)."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from cifarx.cli import app

    uri = f"sqlite:///{tmp_path}/m.db"
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--arch", "table1", "--iters", "2", "--batch-size",
                                  "10", "--threads", "1", "--data-dir", str(data_dir),
                                  "--probe", "grad-max", "--tracking-uri", uri])
    assert trained.exit_code == 0, trained.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    assert run.data.params["probe.grad-max.first"] == "(not set)"  # was missing
    result = runner.invoke(app, ["analyze", "--model", f"runs:/{run.info.run_id}/model",
                                 "--analysis", "grad-cam,filters", "--images", "10",
                                 "--data-dir", str(data_dir), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    analyzed = [r for r in client.search_runs([client.get_experiment_by_name(
        "cifarx").experiment_id]) if r.info.run_id != run.info.run_id][0]
    assert analyzed.data.params["analysis.grad-cam.layer"] == "conv3"
    assert analyzed.data.params["analysis.grad-cam.sanity"] == "false"
    assert analyzed.data.params["analysis.filters.layer"] == "conv1"
