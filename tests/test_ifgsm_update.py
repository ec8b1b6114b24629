"""The untargeted ifgsm update (project issue 9): tiny models built here, CPU only, no CIFAR.

The old update ascended CE(x, y) at every step. Once p(true) is ~0 that step mostly lowers the
true logit further, and an image can stall split between two wrong classes with its pixels at
the clamp. ``iterate`` now ascends log p of the most likely wrong class once that class has
probability >= 0.7; targeted attacks (and fool-noise, which uses them) still descend
CE(x, target).
"""

import torch
import torch.nn.functional as F
from torch import nn

from cifarx.plugins.attacks import iterate

EPS = 1 / 255


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def linear(weight, bias) -> nn.Module:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return frozen(nn.Sequential(nn.Flatten(), layer))


def old_iterate(model, x, labels, targets, eps, confidence, max_steps):
    """The update before issue 9, one image at a time: ascend CE(x, y) (untargeted) or descend
    CE(x, target) (targeted), each image until its goal holds or ``max_steps``."""
    out, steps, success = x.detach().clone(), torch.zeros(len(x), dtype=torch.long), \
        torch.zeros(len(x), dtype=torch.bool)
    for i in range(len(x)):
        xi, aim = x[i:i + 1].detach().clone(), (labels if targets is None else targets)[i:i + 1]
        for step in range(max_steps + 1):
            xi.requires_grad_(True)
            logits = model(xi)
            p = logits.detach().softmax(1)[0]
            if targets is None:
                done = p.scatter(0, labels[i:i + 1], 0.0).max() >= confidence
            else:
                done = p[targets[i]] >= confidence
            if done or step == max_steps:
                success[i] = bool(done)
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, aim, reduction="sum"), xi)
            sign = -1.0 if targets is not None else 1.0
            xi = (xi.detach() + sign * eps * grad.sign()).clamp(0, 1)
            steps[i] += 1
        out[i] = xi.detach()[0]
    return out, steps, success


def stall_model() -> nn.Module:
    """Two pixels, three classes; true class 0. Pixel 0 lowers class 0; pixel 1 raises class 0
    (by 4) and class 2 (by 3). Ascending CE(x, 0) raises pixel 0 and, since lowering class 0
    pays more than raising class 2, lowers pixel 1: it ends clamped at (1, 0) with class 2 at
    0.88 and class 1 at 0.12, where it stays. Class 2 reaches 0.993 at (1, 1)."""
    return linear([[-20.0, 4.0], [0.0, 0.0], [0.0, 3.0]], [8.0, 0.0, 2.0])


def test_the_old_update_stalls_between_two_wrong_classes_and_the_new_one_does_not():
    model = stall_model()
    x, y = torch.tensor([[0.2, 0.5]]), torch.tensor([0])
    assert model(x).argmax(1).item() == 0  # starts classified correctly
    eps = 0.02

    old, old_steps, old_ok = old_iterate(model, x, y, None, eps, 0.99, 200)
    assert not old_ok.any() and old_steps.item() == 200
    assert torch.equal(old, torch.tensor([[1.0, 0.0]]))  # stuck at the clamp
    p = model(old).softmax(1)[0]
    assert 0.8 < p[2] < 0.99 and 0.1 < p[1] < 0.2  # split between the two wrong classes

    adv, steps, ok = iterate(model, x, y, None, eps, 0.99, 200)
    assert ok.all() and steps.item() < 200
    p = model(adv).softmax(1)[0]
    assert p[1:].max() >= 0.99 and p.argmax().item() != 0
    # Every step is one signed step of eps, clipped to [0, 1].
    assert adv.min() >= 0 and adv.max() <= 1
    assert ((adv - x).abs().amax() <= steps.item() * eps + 1e-6)


def random_net(seed: int, classes: int = 5) -> nn.Module:
    """A small random conv net on 3x8x8 images, its scores scaled so that 0.99 is reachable."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, classes))
    with torch.no_grad():
        net[-1].weight.mul_(20)
    return frozen(net)


def images(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_targeted_steps_are_unchanged():
    """Targeted attacks (and fool-noise, which is one from noise) still descend CE(x, target)."""
    model = random_net(1)
    x = images(2, 12)
    with torch.no_grad():
        labels = model(x).argmax(1)
    targets = (labels + 1) % 5
    for confidence, max_steps in ((0.9, 60), (0.999, 5)):
        new = iterate(model, x, labels, targets, 4 * EPS, confidence, max_steps)
        old = old_iterate(model, x, labels, targets, 4 * EPS, confidence, max_steps)
        assert torch.equal(new[1], old[1]) and torch.equal(new[2], old[2])
        assert torch.allclose(new[0], old[0], atol=1e-6)
        if max_steps == 60:
            assert new[2].all() and len(set(new[1].tolist())) > 1  # each stops on its own
        else:
            assert not new[2].any()  # too few steps: failures, kept in the result


def test_untargeted_steps_are_the_old_ones_while_the_image_is_still_its_class():
    """While p(true) is not yet small the step is the assignment's CE(x, y) ascent: the first
    step from a correctly classified image is the old one (so ifgsm's first step is fgsm)."""
    model = random_net(2)
    x = images(3, 16)
    with torch.no_grad():
        labels = model(x).argmax(1)
    new = iterate(model, x, labels, None, 2 * EPS, 0.999, 1)
    old = old_iterate(model, x, labels, None, 2 * EPS, 0.999, 1)
    assert torch.equal(new[1], old[1]) and torch.equal(new[2], old[2])
    assert torch.allclose(new[0], old[0], atol=1e-6)


def test_untargeted_goal_steps_and_batch_independence():
    """Each image reaches some wrong class at >= confidence with eps-sized steps, stops there, and
    gets the same result alone as in the batch."""
    model = random_net(4)
    x = images(5, 10)
    with torch.no_grad():
        labels = model(x).argmax(1)
    adv, steps, ok = iterate(model, x, labels, None, 4 * EPS, 0.99, 200)
    assert ok.all()
    with torch.no_grad():
        p = model(adv).softmax(1)
    assert (p.scatter(1, labels[:, None], 0.0).amax(1) >= 0.99).all()
    assert ((adv - x).flatten(1).abs().amax(1) <= steps * 4 * EPS + 1e-6).all()
    for i in (0, 7):
        one = iterate(model, x[i:i + 1], labels[i:i + 1], None, 4 * EPS, 0.99, 200)
        assert one[1].item() == steps[i].item()
        assert torch.allclose(one[0][0], adv[i], atol=1e-6)
