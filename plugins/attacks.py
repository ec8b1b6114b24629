"""Built-in attacks: ifgsm (the assignment's), fgsm, pgd and fool-noise.

All work in pixel space [0, 1] on a model that holds its own normalization, in float32, on a
whole batch at once. ``eps`` is a step size for ifgsm and fool-noise (no bound on the total
change) and the L-infinity radius for fgsm and pgd. ``target`` is ``None`` (untargeted),
``"next"`` (the class after the true one) or a class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarx import Attack, AttackResult, Option, OptionError, hookimpl


def num_classes(model: nn.Module, images: Tensor) -> int:
    classes = getattr(model, "classes", None)
    if classes:
        return len(classes)
    with torch.no_grad():
        return model(images[:1]).shape[1]


def aims(target: int | str | None, labels: Tensor, classes: int) -> Tensor | None:
    """The class each image is pushed toward, or None for an untargeted attack."""
    if target is None:
        return None
    if target == "next":
        return (labels + 1) % classes
    if not 0 <= target < classes:
        raise OptionError("target", f"the model has classes 0 to {classes - 1}")
    return torch.full_like(labels, target)


def reached(logits: Tensor, labels: Tensor, targets: Tensor | None, confidence: float) -> Tensor:
    """Per image: the target class (or, untargeted, some wrong class) has >= ``confidence``."""
    probs = logits.detach().float().softmax(1)
    if targets is not None:
        return probs.gather(1, targets[:, None]).squeeze(1) >= confidence
    return probs.scatter(1, labels[:, None], 0.0).amax(1) >= confidence


def signed_gradient(model: nn.Module, x: Tensor, aim: Tensor, toward: bool) -> Tensor:
    """The sign of the step that raises the cross-entropy with ``aim`` (``toward``: lowers it).

    The loss is summed, not averaged, so an image's gradient does not depend on its batch.
    """
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), aim, reduction="sum"), x)
    return (-grad if toward else grad).sign()


def untargeted_objective(logits: Tensor, labels: Tensor, switch: float = 0.7) -> Tensor:
    """Per image, what an untargeted step ascends: CE(x, y) until some wrong class has
    probability >= ``switch``, then log p of that class (see :func:`iterate`)."""
    logp = logits.log_softmax(1)
    top = logp.detach().scatter(1, labels[:, None], -torch.inf).argmax(1, keepdim=True)
    lead = logp.gather(1, top).squeeze(1)
    return torch.where(lead.detach().exp() >= switch, lead,
                       -logp.gather(1, labels[:, None]).squeeze(1))


def iterate(model: nn.Module, x: Tensor, labels: Tensor, targets: Tensor | None, eps: float,
            confidence: float, max_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Signed-gradient steps of size ``eps``, each image until its goal holds or ``max_steps``.

    Targeted (``targets``): descend CE(x, target). Untargeted: ascend CE(x, y), the assignment's
    step, until some wrong class has probability >= 0.7, then ascend log p of that class (chosen
    again at each step). Once p(true) is ~0, CE's gradient mostly lowers the true logit further
    and raises the wrong classes only in proportion to their probability, so an image could
    stall split between two wrong classes with its pixels at the clamp (issue 9). Switching
    early (once misclassified, or from the start) commits to a class CE would have passed by,
    and some (cat, on weak nets) crawl toward 0.99. Above 0.5 the class is the only possible
    one and the image is misclassified; 0.5-0.7 measured alike, 0.7 with the fewest slow images
    and 0.8-0.9 meeting CE's stalls first (bench/attack_stalls.py, issue 9).

    Returns (images, steps, success). Every pass feeds only the images still going, and its one
    forward serves both the goal check and the next step's gradient.
    """
    n = len(x)
    x = x.detach().clone()
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    for step in range(max_steps + 1):
        with torch.set_grad_enabled(step < max_steps):
            xa = x[active].requires_grad_(step < max_steps)
            logits = model(xa)
        done = reached(logits, labels[active], None if targets is None else targets[active],
                       confidence)
        success[active] = done
        going = ~done
        if step == max_steps or not going.any():
            break
        # The loss covers only the images still going; the others get a zero gradient.
        if targets is None:
            loss = untargeted_objective(logits[going], labels[active][going]).sum()
            direction = 1.0
        else:
            loss = F.cross_entropy(logits[going], targets[active][going], reduction="sum")
            direction = -1.0
        (grad,) = torch.autograd.grad(loss, xa)
        active = active[going]
        x[active] = (xa.detach()[going] + direction * eps * grad[going].sign()).clamp_(0, 1)
        steps[active] += 1
    return x, steps, success


def build_ifgsm(model: nn.Module, eps: float = 1 / 255, confidence: float = 0.99,
                max_steps: int = 200, target: int | str | None = None):
    """The assignment's algorithm: x <- clip(x + eps * sign(grad_x L)) until a wrong class (or
    the target) has probability >= confidence, where L is CE(x, y) until a wrong class holds
    0.7, then log p of that class (see :func:`iterate`; targeted: x descends CE(x, target));
    images that need more than ``max_steps`` steps end as failures."""
    model.eval()  # batch norm must not mix the images of a batch

    def attack(images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        targets = aims(target, labels, num_classes(model, images))
        adv, steps, success = iterate(model, images, labels, targets, eps, confidence, max_steps)
        return AttackResult(adv, steps, success, targets=targets)
    return attack


def build_fgsm(model: nn.Module, eps: float = 8 / 255):
    """One step: x + eps * sign(grad_x CE(x, y)); success means misclassified."""
    model.eval()  # batch norm must not mix the images of a batch

    def attack(images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        direction = signed_gradient(model, images, labels, toward=False)
        adv = (images + eps * direction).clamp_(0, 1)
        with torch.no_grad():
            success = model(adv).argmax(1) != labels
        return AttackResult(adv, torch.ones_like(labels), success)
    return attack


def build_pgd(model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
              target: int | str | None = None, random_start: bool = True):
    """Projected gradient descent in the L-infinity ball of radius eps around each image."""
    model.eval()  # batch norm must not mix the images of a batch

    def attack(images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        targets = aims(target, labels, num_classes(model, images))
        low, high = (images - eps).clamp(min=0), (images + eps).clamp(max=1)
        x = images
        if random_start:
            noise = torch.rand(images.shape, generator=generator, device=images.device)
            x = torch.min(torch.max(images + (2 * noise - 1) * eps, low), high)
        for _ in range(steps):
            direction = signed_gradient(model, x, labels if targets is None else targets,
                                        toward=targets is not None)
            x = torch.min(torch.max(x + alpha * direction, low), high)
        with torch.no_grad():
            predicted = model(x).argmax(1)
        success = predicted != labels if targets is None else predicted == targets
        return AttackResult(x.detach(), torch.full_like(labels, steps), success, targets=targets)
    return attack


def build_fool_noise(model: nn.Module, eps: float = 1 / 255, confidence: float = 0.99,
                     max_steps: int = 500, target: int | str | None = None):
    """From uniform random noise, targeted steps until the model sees the chosen class with >=
    confidence. The class: ``target``, or by default each image's label (so choosing two
    test images per class makes two fooling images per class)."""
    model.eval()  # batch norm must not mix the images of a batch

    def attack(images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        targets = labels if target is None else aims(target, labels, num_classes(model, images))
        start = torch.rand(images.shape, generator=generator, device=images.device)
        adv, steps, success = iterate(model, start, labels, targets, eps, confidence, max_steps)
        return AttackResult(adv, steps, success, targets=targets, start=start)
    return attack


# The options the attacks share; each attack declares those it takes.
STEP = Option(1 / 255, float, range="(0, 1]", help="the size of each signed-gradient step")
RADIUS = Option(8 / 255, float, range="(0, 1]", help="L-inf radius of the perturbation")
CONFIDENCE = Option(0.99, float, range="(0, 1)",
                    help="stop when a wrong class (or the target) has this probability")
TARGET = Option(None, str, help="a class index or name, or next (the class after the true one); "
                                "not set: untargeted")


@hookimpl
def register_attacks(register):
    register(Attack(
        name="ifgsm", build=build_ifgsm,
        options={"eps": STEP, "confidence": CONFIDENCE, "target": TARGET,
                 "max_steps": Option(200, int, range="[1, inf)",
                                     help="steps after which an image counts as failed")},
        summary="iterative signed gradient, step eps (1/255), until a wrong class has >= "
                "confidence (0.99); targeted with target"))
    register(Attack(name="fgsm", build=build_fgsm, options={"eps": RADIUS},
                    summary="one signed-gradient step of size eps (8/255)"))
    register(Attack(
        name="pgd", build=build_pgd,
        options={"eps": RADIUS, "target": TARGET,
                 "alpha": Option(2 / 255, float, range="(0, 1]", help="the size of each step"),
                 "steps": Option(10, int, range="[1, inf)", help="the number of steps"),
                 "random_start": Option(True, help="start from a random point of the ball")},
        summary="L-inf ball radius eps (8/255), random start, steps (10) of alpha (2/255); "
                "targeted with target"))
    register(Attack(
        name="fool-noise", build=build_fool_noise,
        options={"eps": STEP, "confidence": CONFIDENCE,
                 "target": Option(None, str, help="a class index or name, or next; not set: "
                                                  "each image's own class"),
                 "max_steps": Option(500, int, range="[1, inf)",
                                     help="steps after which an image counts as failed")},
        summary="random noise pushed to a class (each image's label, or target) with >= "
                "confidence (0.99)"))
