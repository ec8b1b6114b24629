"""--label-smoothing, --l1 and --clip-grad: each against a hand computation of one step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarx import Architecture, UserError, hookimpl
from cifarx.testing import run_cli
from cifarx.training.config import TrainConfig, plan
from cifarx.training.loop import assemble, l1_weights, train


class Small:
    """A net with a conv, a BatchNorm and a linear layer, each with a bias."""

    @hookimpl
    def register_architectures(self, register):
        def build(num_classes=10, in_channels=3, image_size=32):
            return nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=4), nn.BatchNorm2d(4),
                                 nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * ((image_size - 3) // 4 + 1) ** 2, num_classes))
        register(Architecture(name="small", build=build))


@pytest.fixture
def small(register_plugin):
    register_plugin(Small(), "small")


def one_step(data_dir, **overrides):
    """Plain SGD, one full-batch step on the 200 synthetic images, no augmentation: (the
    weights before, the result)."""
    config = TrainConfig(arch="small", aug=(), data_dir=str(data_dir), iters=1, batch_size=200,
                         optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="none",
                         lr=0.5, device="cpu", threads=1, precision="fp32", **overrides)
    p = plan(config)
    data = p.load_data()
    setup = assemble(p, data)
    before = {k: v.detach().clone() for k, v in setup.model.net.named_parameters()}
    return before, train(p, data, setup), data, setup


def test_l1_penalizes_conv_and_linear_weights_only():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2),
                        nn.LayerNorm(2))
    assert [id(w) for w in l1_weights(net)] == [id(net[0].weight), id(net[3].weight)]


def test_l1_adds_its_sign_to_the_gradient_and_is_logged(data_dir, small):
    l1, lr = 0.01, 0.5
    before, plain, _, _ = one_step(data_dir)
    same, penalized, _, _ = one_step(data_dir, l1=l1)
    assert all(torch.equal(before[k], same[k]) for k in before)  # the same start
    after = dict(penalized.model.net.named_parameters())
    after_plain = dict(plain.model.net.named_parameters())
    for name, w in before.items():
        shift = after[name] - after_plain[name]  # the penalty's part of the step
        expected = -lr * l1 * w.sign() if name in ("0.weight", "4.weight") else torch.zeros_like(w)
        assert torch.allclose(shift, expected, atol=1e-6), name
    (step, logged), = penalized.history["train/l1"]
    hand = l1 * (before["0.weight"].abs().sum() + before["4.weight"].abs().sum())
    assert step == 1 and logged == pytest.approx(float(hand), rel=1e-5)
    # train/loss stays the cross-entropy, comparable across penalties
    assert penalized.history["train/loss"] == plain.history["train/loss"]
    assert "train/l1" not in plain.history


def test_label_smoothing_loss_matches_a_hand_computation(data_dir, small):
    s = 0.2
    _, result, data, setup = one_step(data_dir, label_smoothing=s)
    _, plain, _, _ = one_step(data_dir)
    # The first step's loss is the starting model's (one_step trained it since: rebuild it).
    p = plan(TrainConfig(arch="small", aug=(), data_dir=str(data_dir), device="cpu",
                         precision="fp32"))
    model = assemble(p, data).model.train()
    with torch.no_grad():
        logp = model(data.train_images.float() / 255).log_softmax(1)
    k, y = logp.shape[1], data.train_labels
    hand = -((1 - s) * logp[torch.arange(len(y)), y] + s / k * logp.sum(1)).mean()
    assert result.history["train/loss"][0][1] == pytest.approx(float(hand), rel=1e-5)
    assert plain.history["train/loss"][0][1] == pytest.approx(float(F.nll_loss(logp, y)),
                                                              rel=1e-5)
    assert abs(float(hand) - float(F.nll_loss(logp, y))) > 0.01  # the test tells them apart


def test_clip_grad_bounds_the_step_and_logs_the_norm_before(data_dir, small):
    c, lr = 0.05, 0.5
    before, plain, _, _ = one_step(data_dir)
    _, clipped, _, _ = one_step(data_dir, clip_grad=c)
    step = {k: dict(clipped.model.net.named_parameters())[k].detach() - w
            for k, w in before.items()}
    step_plain = {k: dict(plain.model.net.named_parameters())[k].detach() - w
                  for k, w in before.items()}
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in
                                                  step.values()]))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in
                                                 step_plain.values()])) / lr
    assert float(total) == pytest.approx(lr * c, rel=1e-4)  # the gradient's norm became c
    assert clipped.history["train/grad_norm"][0][1] == pytest.approx(float(norm), rel=1e-4)
    assert float(norm) > c  # so clipping acted
    for k in step:  # the same direction, scaled
        assert torch.allclose(step[k], step_plain[k] * c / norm, atol=1e-6), k


def test_regularizers_are_logged_as_params(data_dir):
    params = plan(TrainConfig(data_dir=str(data_dir), label_smoothing=0.1, l1=1e-5,
                              clip_grad=2.0)).params()
    assert (params["label_smoothing"], params["l1"], params["clip_grad"]) == (0.1, 1e-5, 2.0)
    defaults = plan(TrainConfig(data_dir=str(data_dir))).params()
    assert (defaults["label_smoothing"], defaults["l1"]) == (0.0, 0.0)
    assert not {"clip_grad", "val_split", "early_stop", "monitor", "keep"} & set(defaults)


@pytest.mark.parametrize("args, message", [
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1], got 1.5"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1], got -0.1"),
    (["--l1", "-1e-4"], "--l1 must be >= 0, got -0.0001"),
    (["--clip-grad", "0"], "--clip-grad must be positive (the largest gradient norm), got 0.0"),
])
def test_bad_regularizer_values_are_one_line(data_dir, in_tmp, args, message):
    result = run_cli("train", "--data-dir", data_dir, "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"cifarx: error: {message}"
    assert not (in_tmp / "mlflow.db").exists()


def test_a_bad_value_is_refused_by_the_plan():
    with pytest.raises(UserError, match="--clip-grad must be positive"):
        plan(TrainConfig(clip_grad=-1.0))
