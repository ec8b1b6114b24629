"""Adversarial images: choosing test images, running an attack batched, the set it makes.

``cifarx attack`` keeps what it made as ``adversarial/set.pt`` in its run: a dict of tensors
(and a few strings) that ``torch.load(path, weights_only=True)`` reads back; see
:func:`make_set` (and :mod:`cifarx.inference.transfer`, which reads sets back). ``cifarx train
--adv-train`` attacks the model being trained (:func:`attack_mode`, :func:`perturb`).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..plugin_api.options import OptionError, flag_label, reword
from ..plugin_api.types import Attack, AttackResult
from ..tracking.run import Run
from ..training.data import class_index
from .predict import predict

SET_ARTIFACT = "adversarial/set.pt"
SET_KEYS = ("images", "adv_images", "labels", "targets", "adv_labels", "adv_conf", "conf",
            "steps", "success", "linf", "l2", "indices", "classes", "attack", "model_uri")
FIGURE_IMAGES = 20  # the assignment's 2 per class: 20 originals and 20 adversarial images
TABLE_IMAGES = 40  # per-image rows printed up to this many images
REPLACE_LIMIT = 10  # spares tried in place of one image that fails (--per-class)

def resolve_target(value: Any, classes: tuple[str, ...], flag: str = "--target"
                   ) -> int | str | None:
    """An attack's ``target`` option: None, ``"next"``, or a class given by index or name ->
    its index."""
    if value is None or value == "next":
        return value
    index = class_index(str(value), classes)
    if index is not None:
        return index
    raise UserError(f"{flag} {str(value)!r} is not a class of this model; accepted: next, 0 to "
                    f"{len(classes) - 1}, or a name: {', '.join(classes)}")


def selection(per_class: int | None, count: int | None, all_test: bool) -> tuple[str, int]:
    """Which test images: ("per_class", k), ("count", n) or ("all", 0); default 2 per class."""
    chosen = [name for name, given in (("--per-class", per_class is not None),
                                       ("--count", count is not None), ("--all-test", all_test))
              if given]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} both choose the images; give one of them")
    for flag, value in (("--per-class", per_class), ("--count", count)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if all_test:
        return "all", 0
    return ("count", count) if count is not None else ("per_class", per_class or 2)


def for_attack(model: nn.Module) -> nn.Module:
    """Eval mode, and parameters that need no gradient: backward computes only the input's.

    Channels-last weights, as in training: a gradient step on table1 ran 1.2x (batch 250) to
    1.6x (one image) faster on the CPU; the inputs may stay in the usual layout.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """The attack contract's model (eval mode, parameters needing no gradient) for the length of
    the block, on a model in training: its mode and its parameters' flags are back after it.

    Eval mode leaves batch norm's running statistics alone (and dropout off); parameters that
    need no gradient keep the attack's backward passes out of their ``.grad``.
    """
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]  # frozen ones (e.g. a timm stem) stay frozen
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def perturb(model: nn.Module, attack: Callable[..., AttackResult], images: Tensor,
            labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Adversarial versions of a training batch's ``images`` (float pixels in [0, 1]), made
    from the model as it is now, detached; and whether the attack reached its goal on each.

    Only checks that need no host sync happen here, at every step; :func:`check_training_attack`
    made the others once, before training.
    """
    with attack_mode(model):
        result = attack(images, labels, generator)
    if not isinstance(result, AttackResult):
        raise TypeError(f"an attack must return an AttackResult, got {type(result).__name__}")
    if result.images.shape != images.shape:
        raise ValueError(f"the attack returned {tuple(result.images.shape)} images for "
                         f"{tuple(images.shape)} input")
    return result.images.detach(), result.success.detach()


def check_training_attack(model: nn.Module, attack: Attack, options: dict[str, Any],
                          classes: tuple[str, ...], images: Tensor, labels: Tensor,
                          seed: int) -> Callable[..., AttackResult]:
    """``--adv-train``: build the attack on the model and try it on a few training images, so
    that what only the attack can check fails before a run opens; returns the attack.

    ``images`` are float pixels in [0, 1] on the model's device. The trial draws from a
    generator of its own: training draws the same numbers with or without it.
    """
    if options.get("target") is not None:  # a class name or index, as `cifarx attack` takes it
        options = {**options, "target": resolve_target(options["target"], classes,
                                                       "--attack-opt target")}
    try:
        with attack_mode(model):  # built-in attacks set eval mode when built
            built = attack.build(model, **options)
            result = built(images, labels, torch.Generator(images.device).manual_seed(seed))
    except OptionError as exc:
        raise reword(exc, lambda name: flag_label("--attack-opt", None, name), options) from None
    except UserError as exc:
        raise UserError(f"--adv-train {attack.name}: {exc}") from None
    if not isinstance(result, AttackResult):
        raise TypeError(f"an attack must return an AttackResult, got {type(result).__name__}")
    adv = result.images
    if adv.shape != images.shape or adv.dtype != torch.float32 or adv.min() < 0 or adv.max() > 1:
        raise ValueError(f"attack {attack.name} returned {adv.dtype} {tuple(adv.shape)} images; "
                         f"expected float32 {tuple(images.shape)} in [0, 1]")
    if result.start is not None:
        raise UserError(f"--adv-train {attack.name}: the attack starts from images of its own "
                        "(noise), not from the batch's, so its images have no true class; "
                        "accepted: an attack that perturbs its input, e.g. fgsm, pgd, ifgsm")
    return built




def choose(predicted: Tensor, labels: Tensor, classes: tuple[str, ...], how: tuple[str, int],
           seed: int, skip_class: int | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """Indices of test images the model classifies correctly, grouped by class; and for
    ``--per-class``, the spare candidates of each class, in order (see :func:`attack_images`).

    The images are taken in a random order fixed by ``seed``. ``skip_class`` leaves out the
    class a targeted attack aims at (its images need no attack).
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep = (predicted == labels)[order]
    if skip_class is not None:
        keep &= labels[order] != skip_class
    candidates = order[keep]
    kind, n = how
    if kind == "per_class":
        wanted = [c for c in range(len(classes)) if c != skip_class]
        pools = {c: candidates[labels[candidates] == c] for c in wanted}
        fewest = min(wanted, key=lambda c: len(pools[c]))
        if len(pools[fewest]) < n:
            raise UserError(f"--per-class {n}: the model classifies only {len(pools[fewest])} "
                            f"test images of class {classes[fewest]!r} correctly; accepted: "
                            f"--per-class 1 to {len(pools[fewest])}" if len(pools[fewest])
                            else f"--per-class {n}: the model classifies no test image of class "
                            f"{classes[fewest]!r} correctly")
        chosen = torch.cat([pools[c][:n] for c in wanted])
        spares = {c: pools[c][n:] for c in wanted}
    elif kind == "count":
        if len(candidates) < n:
            raise UserError(f"--count {n}: the model classifies only {len(candidates)} test "
                            f"images correctly; accepted: --count 1 to {len(candidates)}")
        chosen = candidates[:n]
    else:
        chosen = candidates
        if not len(chosen):
            raise UserError("--all-test: the model classifies no test image correctly")
    return chosen[torch.sort(labels[chosen], stable=True).indices], \
        spares if kind == "per_class" else {}


def generate(attack: Callable[..., AttackResult], images: Tensor, labels: Tensor,
             device: torch.device, batch_size: int, seed: int) -> tuple[list[AttackResult], float]:
    """Run ``attack`` on uint8 ``images`` in batches on ``device``; (results, seconds)."""
    generator = torch.Generator(device).manual_seed(seed)
    results = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = x.to(device).float().div_(255)
        result = attack(x, y.to(device), generator)
        if not isinstance(result, AttackResult):
            raise TypeError(f"an attack must return an AttackResult, got {type(result).__name__}")
        adv = result.images
        if adv.shape != x.shape or adv.dtype != torch.float32:
            raise ValueError(f"the attack returned {adv.dtype} {tuple(adv.shape)} images for "
                             f"float32 {tuple(x.shape)} input")
        if adv.min() < 0 or adv.max() > 1:
            raise ValueError("the attack returned pixels outside [0, 1]")
        results.append(result)
    sync()
    return results, time.perf_counter() - start


def merge(results: list[AttackResult]) -> AttackResult:
    """The batches' results as one, on the CPU."""
    def cat(name):
        parts = [getattr(r, name) for r in results]
        return None if parts[0] is None else torch.cat([p.detach().cpu() for p in parts])
    return AttackResult(cat("images"), cat("steps"), cat("success"), cat("targets"), cat("start"))


def attack_images(attack: Callable[..., AttackResult], images: Tensor, labels: Tensor,
                  chosen: Tensor, spares: dict[int, Tensor], device: torch.device,
                  batch_size: int, seed: int) -> tuple[AttackResult, Tensor, int, float]:
    """Attack the test images ``chosen``; while an image fails and its class has spares, attack
    the next spare in its place (at most ``REPLACE_LIMIT`` per image), so that the set holds as
    many successes per class as the model allows. An image still failing stays, as a failure.

    Returns (the result, on the CPU, one row per kept image; the kept test indices; how many
    images were replaced; seconds spent attacking).
    """
    indices = chosen.clone()
    result, seconds = generate(attack, images[indices], labels[indices], device, batch_size, seed)
    result = merge(result)
    used = {c: 0 for c in spares}
    replaced, tries = 0, torch.zeros(len(indices), dtype=torch.long)
    while True:
        slots = []
        for i in (~result.success).nonzero().flatten().tolist():
            c = int(labels[indices[i]])
            if c in spares and used[c] < len(spares[c]) and tries[i] < REPLACE_LIMIT:
                indices[i], used[c], tries[i] = spares[c][used[c]], used[c] + 1, tries[i] + 1
                slots.append(i)
        if not slots:
            return result, indices, replaced, seconds
        slots = torch.tensor(slots)
        more, spent = generate(attack, images[indices[slots]], labels[indices[slots]], device,
                               batch_size, seed + replaced + 1)
        more = merge(more)
        for name in ("images", "steps", "success", "targets", "start"):
            if getattr(result, name) is not None:
                getattr(result, name)[slots] = getattr(more, name)
        replaced, seconds = replaced + len(slots), seconds + spent


def make_set(model: nn.Module, results: list[AttackResult], images: Tensor, labels: Tensor,
             indices: Tensor, device: torch.device, classes: tuple[str, ...], attack: str,
             options: dict[str, Any], model_uri: str, batch_size: int = 1000) -> dict[str, Any]:
    """The adversarial set, on the CPU. Everything the model says is measured here, again.

    ``images`` are what the attack started from (the test images, or its noise), in [0, 1];
    ``labels`` their class (the true one; for noise, the model's); ``targets`` the class each
    image was pushed to (-1: untargeted); ``adv_labels``/``adv_conf`` the model's class and its
    probability on ``adv_images``; ``conf`` its probability for ``labels`` on ``images``;
    ``linf``/``l2`` the size of ``adv_images - images``; ``indices`` the test images used (-1
    where the attack started from elsewhere).
    """
    cpu = lambda name: torch.cat([getattr(r, name).detach().cpu() for r in results])  # noqa: E731
    originals = images.float().div(255)
    started = [r.start is not None for r in results]
    if any(started):
        originals = torch.cat([(r.start.detach().cpu() if r.start is not None else part)
                               for r, part in zip(results, originals.split(batch_size))])
        indices = torch.cat([torch.full_like(part, -1) if r.start is not None else part
                             for r, part in zip(results, indices.split(batch_size))])
    adv_images = cpu("images")
    clean = predict(model, originals, device).cpu().softmax(1)
    if any(started):  # noise has no true class: its class is the one the model gives it
        labels = clean.argmax(1)
    adv = predict(model, adv_images, device).cpu().softmax(1)
    adv_conf, adv_labels = adv.max(1)
    targets = torch.cat([(r.targets.detach().cpu() if r.targets is not None
                          else torch.full((len(r.images),), -1)) for r in results]).long()
    delta = (adv_images - originals).flatten(1)
    return {
        "images": originals.contiguous(), "adv_images": adv_images.contiguous(),
        "labels": labels.long(), "targets": targets, "adv_labels": adv_labels,
        "adv_conf": adv_conf, "conf": clean.gather(1, labels.long()[:, None]).squeeze(1),
        "steps": cpu("steps").long(), "success": cpu("success").bool(),
        "linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "indices": indices.long(),
        "classes": list(classes), "attack": attack,
        "options": {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
        "model_uri": model_uri,
    }


def summary(adv_set: dict[str, Any], seconds: float) -> dict[str, float]:
    """The attack run's metrics. Norms are over every image, failures included."""
    n = len(adv_set["labels"])
    metrics = {
        "attack/images": n,
        "attack/success_rate": adv_set["success"].float().mean().item(),
        "attack/failures": int((~adv_set["success"]).sum()),
        "attack/misclassified_rate":
            (adv_set["adv_labels"] != adv_set["labels"]).float().mean().item(),
        "attack/adv_conf_mean": adv_set["adv_conf"].mean().item(),
        "attack/mean_steps": adv_set["steps"].float().mean().item(),
        "attack/linf_mean": adv_set["linf"].mean().item(),
        "attack/linf_max": adv_set["linf"].max().item(),
        "attack/l2_mean": adv_set["l2"].mean().item(),
        "attack/l2_max": adv_set["l2"].max().item(),
        "attack/seconds": seconds,
        "attack/images_per_second": n / seconds if seconds > 0 else math.nan,
    }
    targeted = adv_set["targets"] >= 0
    if targeted.any():
        metrics["attack/target_rate"] = (adv_set["adv_labels"] == adv_set["targets"])[targeted] \
            .float().mean().item()
    return metrics


def figure_rows(labels: Tensor, limit: int = FIGURE_IMAGES) -> list[int]:
    """Up to ``limit`` images, the same number from each class present, in set order."""
    present = labels.unique().tolist()
    per = max(1, limit // len(present))
    rows = [i for c in present for i in (labels == c).nonzero().flatten()[:per].tolist()]
    return sorted(rows)[:limit]


def log_attack(run: Run, adv_set: dict[str, Any], metrics: dict[str, float],
               params: dict[str, Any]):
    from ..figures import adversarial_examples

    now = int(time.time() * 1000)
    run.log_params(params)
    run.log_points([(key, float(value), 0, now) for key, value in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(SET_ARTIFACT).name
        torch.save(adv_set, path)
        run.log_artifact(path, str(Path(SET_ARTIFACT).parent))
    classes = adv_set["classes"]
    rows = figure_rows(adv_set["labels"])
    captions = [(f"{classes[adv_set['labels'][i]]} {adv_set['conf'][i]:.1%}",
                 f"L-inf {adv_set['linf'][i] * 255:.3g}/255",
                 f"{classes[adv_set['adv_labels'][i]]} {adv_set['adv_conf'][i]:.1%}"
                 + ("" if adv_set["success"][i] else " (failed)")) for i in rows]
    fooled = [bool(adv_set["adv_labels"][i] != adv_set["labels"][i]) for i in rows]
    title = (f"{adv_set['attack']} on {adv_set['model_uri']}: success "
             f"{metrics['attack/success_rate']:.1%} of {metrics['attack/images']} images")
    run.log_figure(adversarial_examples(adv_set["images"][rows], adv_set["adv_images"][rows],
                                        captions, fooled, title), "figures/adversarial.png")
