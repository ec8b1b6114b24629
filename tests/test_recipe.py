"""The parts of the 94% recipe (issue 22), each on its own: Muon, per-parameter learning-rate
scales, the linear schedule, weight averaging (--ema), reflection crops, airbench's whitening
and dirac init; then the recipe file, validated and run for a few iterations."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cifarx import Augmentation, hookimpl
from cifarx.testing import run_cli
from cifarx.training.config import TrainConfig, plan
from cifarx.training.loop import assemble, averaging, train
from cifarx.training.model import Classifier
from cifarx.training.muon import Muon, orthogonalize
from cifarx.training.optim import lr_factor, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "studies" / "cifar10-94.toml"


def test_orthogonalize_pushes_every_singular_value_near_one():
    g = torch.randn(16, 72) * torch.logspace(-3, 2, 72)  # badly conditioned, wide
    for matrix in (g, g.T):
        s = torch.linalg.svdvals(orthogonalize(matrix, steps=5).float())
        assert s.min() > 0.6 and s.max() < 1.25, s


def test_muon_step_on_a_filter_is_an_orthogonal_matrix_at_lr_and_keeps_its_norm():
    conv = nn.Conv2d(8, 16, 3, bias=True)
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    lr, momentum = 0.1, 0.5
    Muon(conv.parameters(), lr=lr, momentum=momentum, filter_momentum=0.6).step()
    normalized = w * (16 ** 0.5 / w.norm())
    update = ((normalized - conv.weight.detach()) / lr).reshape(16, -1)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.5  # every direction moved by about lr
    # the bias: SGD with Nesterov momentum, from a zero buffer: g + m * g
    assert torch.allclose(conv.bias.detach(), b - lr * (1 + momentum) * conv.bias.grad)


def test_lr_scale_multiplies_the_rate_and_divides_the_decay():
    fast, slow = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    fast.lr_scale = 64.0
    opt = make_optimizer("nesterov", [{"params": [slow, fast], "lr": 0.1}], 0.1, 0.9, 5e-4)
    groups = {len(g["params"][0]): g for g in opt.param_groups}
    assert groups[3]["lr"] == pytest.approx(0.1) and groups[3]["weight_decay"] == 5e-4
    assert groups[2]["lr"] == pytest.approx(6.4)
    assert groups[2]["lr"] * groups[2]["weight_decay"] == pytest.approx(0.1 * 5e-4)


def test_linear_schedule_falls_straight_to_zero():
    f = lr_factor("linear", 200)
    assert [f(0), f(50), f(200), f(250)] == [1.0, 0.75, 0.0, 0.0]


def test_ema_weights_follow_the_formula_after_three_steps():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))
    model = Classifier(nn.Identity(), net, ("a", "b"))
    averaged = averaging(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(3):
        model(torch.rand(4, 3, 8, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        averaged.update_parameters(model)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in ("net.0.weight", "net.3.bias", "net.1.running_mean"):  # buffers averaged too
        expected = seen[0][key]
        for state in seen[1:]:
            expected = 0.9 * expected + 0.1 * state[key]
        assert torch.allclose(averaged.module.state_dict()[key], expected, atol=1e-6), key
    assert not torch.allclose(averaged.module.net[0].weight, model.net[0].weight)


def test_reflection_crop_only_moves_pixels_of_the_image():
    from cifarx.plugins.augmentations import random_crop

    x = torch.rand(64, 3, 8, 8) + 1  # no zeros anywhere
    out = random_crop(x, torch.Generator().manual_seed(0), pad=2, padding="reflection")
    assert out.shape == x.shape and out.min() >= 1
    zeros = random_crop(x, torch.Generator().manual_seed(0), pad=2)
    assert (zeros == 0).any()  # the default pads with the mean colour
    with pytest.raises(ValueError, match="reflection padding of 8 needs images larger"):
        random_crop(x, torch.Generator(), pad=8, padding="reflection")


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    from cifarx.plugins.augmentations import random_flip

    x = torch.arange(8.0).view(1, 1, 1, 8).repeat(1000, 1, 1, 1)
    indices = torch.randperm(1000)
    mirrored = [random_flip(x, torch.Generator(), alternate=True, indices=indices,
                            epoch=e)[:, 0, 0, 0] == 7 for e in range(3)]
    assert 0.45 < mirrored[0].float().mean() < 0.55  # p = 0.5 in the first epoch
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
    again = random_flip(x[:10], torch.Generator(), alternate=True, indices=indices[:10], epoch=0)
    assert torch.equal(again[:, 0, 0, 0] == 7, mirrored[0][:10])  # fixed by position


def test_whitening_layer_whitens_its_patches():
    from cifarx.plugins.airbench import Whitening

    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.3], [0.0, 0.6, 0.5], [0.0, 0.0, 0.2]])
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 12, 12))
    images = images + 0.5 * images.roll(1, -1)  # neighbouring pixels correlated
    layer = Whitening(3, eps=1e-9)  # the default eps damps the weakest directions a little
    layer.init_from_data(images)
    out = torch.nn.functional.conv2d(images, layer.conv.weight[:12])  # the positive half
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=1e-3)
    assert not layer.conv.weight.requires_grad and layer.conv.bias.requires_grad


def test_airbench_starts_each_conv_as_the_identity_and_scales_biases():
    from cifarx.plugins.airbench import BIAS_LR, build_airbench

    net = build_airbench(width1=32, width2=64, width3=64)
    conv = net.blocks[1].conv1  # 32 -> 64
    x = torch.randn(2, 32, 5, 5)
    assert torch.allclose(conv(x)[:, :32], x, atol=1e-6)
    assert net.blocks[0].norm1.bias.lr_scale == BIAS_LR
    assert not net.blocks[0].norm1.weight.requires_grad
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_airbench(whiten=False)(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_airbench_whitening_is_set_from_the_training_images(data_dir):
    p = plan(TrainConfig(arch="airbench", data_dir=str(data_dir), device="cpu", iters=1,
                         batch_size=50, threads=1))
    setup = assemble(p, p.load_data())
    whiten = setup.model.net.whiten.conv.weight
    fresh = type(setup.model.net.whiten)(3).conv.weight
    assert not torch.allclose(whiten, fresh)
    assert torch.allclose(whiten[:12], -whiten[12:])


def test_recipe_file_is_one_configuration_of_five_seeds_on_the_full_data():
    from cifarx.studies.study import load

    study = load(RECIPE)
    assert study.seeds == (0, 1, 2, 3, 4)
    assert study.train["arch"] == "airbench" and study.train["train-split"] == "all"
    assert not study.grid and not study.configurations and not study.random


def test_recipe_validates_and_runs_twenty_iterations(data_dir, tracking_uri):
    """The shipped recipe's options, on the small synthetic set: batches and evaluations
    shrunk to fit, everything else as shipped."""
    from mlflow import MlflowClient

    out = run_cli("sweep", str(RECIPE), "--seeds", "1", "--set", "iters=20",
                  "--set", "batch-size=50", "--set", "eval-every=20",
                  "--set", f"data-dir={data_dir}", "--set", "device=cpu",
                  "--tracking-uri", tracking_uri, "--experiment", "recipe-test")
    assert out.exit_code == 0, out.output
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("recipe-test").experiment_id])
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert trial.info.status == "FINISHED"
    params = trial.data.params
    assert params["optimizer"] == "muon" and params["tta"] == "flip-translate"
    assert params["aug.crop.padding"] == "reflection" and params["iters"] == "20"


@pytest.mark.parametrize("flag, message", [
    (["--ema", "1.5"], "--ema must be a decay in (0, 1), such as 0.99, got 1.5"),
    (["--aug-opt", "crop.padding=mirror"], "crop.padding"),
    (["--arch-opt", "width1=0"], "width1"),
])
def test_bad_recipe_options_are_one_line_and_open_no_run(data_dir, tracking_uri, flag, message):
    import mlflow

    out = run_cli("train", "--arch", "airbench", "--iters", "1", "--data-dir", str(data_dir),
                  "--tracking-uri", tracking_uri, "--experiment", "bad-recipe", *flag)
    assert out.exit_code == 2 and message in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    assert mlflow.get_experiment_by_name("bad-recipe") is None or mlflow.search_runs(
        experiment_names=["bad-recipe"]).empty


def test_ema_run_evaluates_and_keeps_the_averaged_weights(data_dir):
    config = TrainConfig(arch="airbench", arch_options=("width1=8", "width2=16", "width3=16"),
                         aug=(), data_dir=str(data_dir), device="cpu", iters=3, batch_size=50,
                         eval_every=3, threads=1, precision="fp32", ema=0.5)
    p = plan(config)
    data = p.load_data()
    setup = assemble(p, data)
    trained = setup.model
    result = train(p, data, setup)
    assert result.model is setup.averaged.module and result.model is not trained
    assert not torch.allclose(result.model.net.head.weight, trained.net.head.weight)


class Recorder:
    """A pixels-stage augmentation that records what the loop tells it."""

    seen: list = []

    @staticmethod
    def apply(images, generator, indices=None, epoch=None):
        Recorder.seen.append((indices.tolist(), epoch))
        return images

    @hookimpl
    def register_augmentations(self, register):
        register(Augmentation(name="recorder", stage="pixels", apply=Recorder.apply))


def test_the_loop_tells_positional_augmentations_each_batch_and_epoch(data_dir, register_plugin):
    register_plugin(Recorder(), "recorder")
    Recorder.seen.clear()
    config = TrainConfig(arch="airbench", arch_options=("width1=8", "width2=8", "width3=8"),
                         aug=("normalize", "recorder"), data_dir=str(data_dir), device="cpu",
                         iters=10, batch_size=50, eval_every=10, threads=1, precision="fp32")
    p = plan(config)
    data = p.load_data()
    train(p, data, assemble(p, data))
    n = len(data.train_images) // 50  # batches per pass
    assert [epoch for _, epoch in Recorder.seen] == [i // n for i in range(10)]
    first_pass = sum((indices for indices, _ in Recorder.seen[:n]), [])
    assert sorted(first_pass) == list(range(n * 50))  # a permutation of the images


def test_describe_names_the_architectures_own_training_defaults():
    out = run_cli("describe", "architecture", "airbench")
    assert out.exit_code == 0, out.output
    assert "trains by default with --optimizer muon, --lr 0.24" in out.output
