"""Adversarial images: choosing test images, running an attack batched, the stored set, transfer.

``cifarx attack`` keeps what it made as ``adversarial/set.pt`` in its run: a dict of tensors
(and a few strings) that ``torch.load(path, weights_only=True)`` reads back; see
:func:`make_set`. ``cifarx transfer`` feeds stored sets to other models. ``cifarx train
--adv-train`` attacks the model being trained (:func:`attack_mode`, :func:`perturb`), and
``--adv-data`` adds stored sets to its training data (:func:`training_sets`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import __version__
from .errors import UserError
from .plugin_types import Attack, AttackResult, Dataset
from .tracking import Run, _quiet_mlflow, load_model, source_run_id, start_run

SET_ARTIFACT = "adversarial/set.pt"
SET_KEYS = ("images", "adv_images", "labels", "targets", "adv_labels", "adv_conf", "conf",
            "steps", "success", "linf", "l2", "indices", "classes", "attack", "model_uri")
FIGURE_IMAGES = 20  # the assignment's 2 per class: 20 originals and 20 adversarial images
TABLE_IMAGES = 40  # per-image rows printed up to this many images
# Options with a flag of their own on `cifarx attack`; any other goes through --attack-opt.
FLAGS = ("eps", "confidence", "alpha", "steps", "max_steps", "target")


def parse_fraction(text: str, flag: str) -> float:
    """``"1/255"`` or ``"0.0039"`` -> float."""
    try:
        if "/" in text:
            top, bottom = text.split("/")
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--{flag} {text!r} is not a number; accepted: a decimal such as 0.0039 "
                        "or a fraction such as 1/255") from None


def parse_value(text: str) -> Any:
    """An ``--attack-opt`` value: an integer, a number or fraction, true/false, or text."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return parse_fraction(text, "option")
    except UserError:
        return text


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--attack-opt {pair!r}: accepted: name=value, e.g. "
                            "--attack-opt random_start=false")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    return options


def flag_of(name: str, flags: tuple[str, ...] = FLAGS) -> str:
    return f"--{name.replace('_', '-')}" if name in flags else f"--attack-opt {name}=..."


def resolve_options(attack: Attack, given: dict[str, Any],
                    flags: tuple[str, ...] = FLAGS) -> dict[str, Any]:
    """The attack's options: its defaults (from ``build``'s signature) updated with ``given``.

    A name ``build`` does not take is a UserError that lists the ones it does, each as the flag
    that sets it (``flags``: the options with a flag of their own; ``cifarx train`` has none).
    """
    params = list(inspect.signature(attack.build).parameters.values())[1:]  # after the model
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    unknown = [k for k in given if k not in named]
    if unknown and not takes_any:
        accepted = ", ".join(flag_of(n, flags) for n in named) or "none"
        raise UserError(f"attack {attack.name} has no option {flag_of(unknown[0], flags)}; "
                        f"its options: {accepted}")
    options = {n: p.default for n, p in named.items() if p.default is not p.empty}
    options.update(given)
    return options


def resolve_target(value: Any, classes: tuple[str, ...]) -> int | str | None:
    """``--target``: None, ``"next"``, or a class given by index or name -> its index."""
    if value is None or value == "next":
        return value
    text = str(value)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    if text in classes:
        return classes.index(text)
    raise UserError(f"--target {text!r} is not a class of this model; accepted: next, 0 to "
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


def prepare(model: nn.Module) -> nn.Module:
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
    try:
        if "target" in options:  # a class name or index, as `cifarx attack --target` takes it
            options = {**options, "target": resolve_target(options["target"], classes)}
        with attack_mode(model):  # built-in attacks set eval mode when built
            built = attack.build(model, **options)
            result = built(images, labels, torch.Generator(images.device).manual_seed(seed))
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


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, device: torch.device,
              batch_size: int = 1000) -> Tensor:
    """Float32 logits on the CPU for images (uint8, or float pixels in [0, 1]), in batches."""
    out = []
    for part in images.split(batch_size):
        x = part.to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        out.append(model(x).float().cpu())
    return torch.cat(out)


def choose(predicted: Tensor, labels: Tensor, classes: tuple[str, ...], how: tuple[str, int],
           seed: int, skip_class: int | None = None) -> Tensor:
    """Indices of test images the model classifies correctly, grouped by class.

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
    elif kind == "count":
        if len(candidates) < n:
            raise UserError(f"--count {n}: the model classifies only {len(candidates)} test "
                            f"images correctly; accepted: --count 1 to {len(candidates)}")
        chosen = candidates[:n]
    else:
        chosen = candidates
        if not len(chosen):
            raise UserError("--all-test: the model classifies no test image correctly")
    return chosen[torch.sort(labels[chosen], stable=True).indices]


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
    clean = logits_of(model, originals, device).softmax(1)
    if any(started):  # noise has no true class: its class is the one the model gives it
        labels = clean.argmax(1)
    adv = logits_of(model, adv_images, device).softmax(1)
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
    from .figures import adversarial_examples

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


def image_table(adv_set: dict[str, Any]):
    from rich.table import Table

    classes = adv_set["classes"]
    table = Table("image", "class", "conf", "adv. class", "conf", "steps", "L-inf", "L2", "goal",
                  title=f"{adv_set['attack']}: each image (test set index; L-inf in 1/255)")
    for i in range(len(adv_set["labels"])):
        table.add_row(
            str(int(adv_set["indices"][i])) if adv_set["indices"][i] >= 0 else "noise",
            classes[adv_set["labels"][i]],
            f"{adv_set['conf'][i]:.1%}", classes[adv_set["adv_labels"][i]],
            f"{adv_set['adv_conf'][i]:.1%}", str(int(adv_set["steps"][i])),
            f"{adv_set['linf'][i] * 255:.1f}", f"{adv_set['l2'][i]:.3f}",
            "ok" if adv_set["success"][i] else "[red]failed[/]")
    return table


# --- transfer -------------------------------------------------------------------------------


def load_set(ref: str, uri: str, flag: str = "--adversarial") -> dict[str, Any]:
    """The set of an attack run (its id), or a set.pt file; ``flag`` starts the messages."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = Path(ref).expanduser()
    if path.suffix == ".pt" and path.is_file():
        return read_set(path, ref, flag)
    _quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    accepted = "accepted: the run id of a `cifarx attack` run, or a set.pt file"
    try:
        client.get_run(ref)
        stored = [a.path for a in client.list_artifacts(ref, str(Path(SET_ARTIFACT).parent))]
    except MlflowException as exc:
        raise UserError(f"{flag} {ref}: no such run in {uri} "
                        f"({exc.message.splitlines()[0]}); {accepted}") from None
    if SET_ARTIFACT not in stored:
        raise UserError(f"{flag} {ref}: the run has no adversarial set ({SET_ARTIFACT}); "
                        f"{accepted}")
    with tempfile.TemporaryDirectory() as tmp:
        return read_set(Path(client.download_artifacts(ref, SET_ARTIFACT, tmp)), ref, flag)


def read_set(path: Path, ref: str, flag: str = "--adversarial") -> dict[str, Any]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, keep it to one line
        raise UserError(f"{flag} {ref}: cannot read {path.name} ({type(exc).__name__})") \
            from None
    missing = [k for k in SET_KEYS if not isinstance(loaded, dict) or k not in loaded]
    if missing:
        raise UserError(f"{flag} {ref}: not an adversarial set (missing "
                        f"{', '.join(missing)})")
    return loaded


def training_sets(refs: tuple[str, ...], uri: str, classes: tuple[str, ...],
                  image_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, int]:
    """``--adv-data``: the adversarial images of stored sets with their true labels, and how
    many distinct test images they were made from (the attack command attacks test images).

    The images stay float32, as the attack made them (see :class:`cifarx.data.TrainingImages`).
    """
    images, labels, tested = [], [], set()
    for ref in refs:
        adv_set = load_set(ref, uri, "--adv-data")
        if (adv_set["indices"] < 0).any():
            raise UserError(f"--adv-data {ref}: this {adv_set['attack']} set starts from noise, "
                            "so its images have no true class; accepted: a set made from test "
                            "images (ifgsm, fgsm, pgd, ...)")
        shape = tuple(adv_set["adv_images"].shape[1:])
        if shape != image_shape or list(adv_set["classes"]) != list(classes):
            raise UserError(f"--adv-data {ref}: the set has {_images_of(shape, adv_set['classes'])}"
                            f"; the training data {_images_of(image_shape, classes)}")
        images.append(adv_set["adv_images"].float())
        labels.append(adv_set["labels"].long())
        tested.update(adv_set["indices"].tolist())
    return torch.cat(images), torch.cat(labels), len(tested)


def _images_of(shape: tuple[int, ...], classes) -> str:
    return (f"{'x'.join(map(str, shape))} images of {len(classes)} classes "
            f"({', '.join(list(classes)[:3])}, ...)")


def transfer_scores(adv_set: dict[str, Any], model: nn.Module, device: torch.device) -> dict:
    """How a target model does on a stored set.

    ``transfer_rate``: among the images whose original the target classifies correctly, the
    fraction it misclassifies after the attack. ``same_class_rate``: among those, and where the
    attack fooled the source model, the fraction where the target picks the source's wrong class.
    ``target_rate`` (targeted sets): the fraction the target assigns to the attack's target.
    """
    labels = adv_set["labels"]
    clean = logits_of(model, adv_set["images"], device).argmax(1)
    adv = logits_of(model, adv_set["adv_images"], device).argmax(1)
    clean_ok = clean == labels
    fooled_source = adv_set["adv_labels"] != labels

    def rate(hits: Tensor, among: Tensor) -> float:
        return hits[among].float().mean().item() if among.any() else math.nan

    scores = {
        "images": len(labels),
        "clean_acc": clean_ok.float().mean().item(),
        "adv_acc": (adv == labels).float().mean().item(),
        "transfer_rate": rate(adv != labels, clean_ok),
        "same_class_rate": rate(adv == adv_set["adv_labels"], clean_ok & fooled_source),
        "counted": int(clean_ok.sum()),
    }
    targeted = adv_set["targets"] >= 0
    if targeted.any():
        scores["target_rate"] = rate(adv == adv_set["targets"], targeted)
    return scores


def short_key(text: str, taken: set[str]) -> str:
    """A short name for metric keys: a run id's first 8 characters, else the URI or path."""
    run = re.match(r"(?:runs:/)?([0-9a-f]{32})(?:/|$)", text)
    key = run.group(1)[:8] if run else \
        re.sub(r"[^A-Za-z0-9_.-]+", "-", text.removeprefix("models:/")).strip("-")[-24:] or "model"
    base, i = key, 2
    while key in taken:
        key, i = f"{base}-{i}", i + 1
    taken.add(key)
    return key


def describe_model(uri: str, client) -> str:
    """``table1 1a2b3c4d`` for a run's model (its architecture tag), else the URI."""
    from mlflow.exceptions import MlflowException

    run_id = uri[len("runs:/"):].split("/")[0] if uri.startswith("runs:/") else None
    if not run_id:
        return uri
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return uri
    return f"{run.data.tags.get('cifarx.arch') or run.info.run_name} {run_id[:8]}"


def log_transfer(run: Run, sources: list[dict], targets: list[dict], cells: list[dict]):
    from .figures import transfer_matrix

    now = int(time.time() * 1000)
    points = [(f"transfer/{c['source']}/{c['target']}/{name}", float(c[name]), 0, now)
              for c in cells for name in ("clean_acc", "adv_acc", "transfer_rate",
                                          "same_class_rate", "target_rate") if name in c]
    run.log_points(points)
    matrix = {name: [[next(c[name] for c in cells if c["source"] == s["key"]
                           and c["target"] == t["key"]) for t in targets] for s in sources]
              for name in ("clean_acc", "adv_acc", "transfer_rate", "same_class_rate")}
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    run.log_dict({"sources": sources, "targets": targets,
                  "cells": [{k: clean(v) for k, v in c.items()} for c in cells],
                  "matrix": {k: [[clean(v) for v in row] for row in rows]
                             for k, rows in matrix.items()}}, "transfer.json")
    if len(sources) * len(targets) > 1:
        run.log_figure(transfer_matrix(matrix["transfer_rate"], matrix["adv_acc"],
                                       [s["label"] for s in sources],
                                       [t["label"] for t in targets]),
                       "figures/transfer_matrix.png")


def transfer_table(sources: list[dict], targets: list[dict], cells: list[dict]):
    """One row per pair, or for more than one pair a set x model matrix that fits a terminal."""
    from rich.table import Table

    pct = lambda v: "-" if math.isnan(v) else f"{v:.1%}"  # noqa: E731
    if len(cells) == 1:
        (c,) = cells
        table = Table("adversarial set", "target model", "images", "acc orig.", "acc adv.",
                      "transfer", "same class", title="transfer of adversarial images")
        table.add_row(sources[0]["label"], targets[0]["label"], str(c["images"]),
                      pct(c["clean_acc"]), pct(c["adv_acc"]), pct(c["transfer_rate"]),
                      pct(c["same_class_rate"]))
        return table
    table = Table("adversarial set", *(t["label"] for t in targets),
                  title="transfer of adversarial images: transfer rate / accuracy on them")
    cell = {(c["source"], c["target"]): c for c in cells}
    for s in sources:
        table.add_row(s["label"], *(f"{pct(cell[s['key'], t['key']]['transfer_rate'])} / "
                                    f"{pct(cell[s['key'], t['key']]['adv_acc'])}"
                                    for t in targets))
    return table


# --- the commands ---------------------------------------------------------------------------


@dataclass
class Attacked:
    adv_set: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    experiment_id: str


def attack_command(model_uri: str, attack: Attack, dataset: Dataset, data_dir: Path,
                   given: dict[str, Any], how: tuple[str, int], batch_size: int,
                   device: torch.device, seed: int, uri: str, experiment: str,
                   run_name: str | None, on_start: Callable[[int], None] | None = None) -> Attacked:
    """``cifarx attack``: every check first, then one run linked to the model's run."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    model = prepare(load_model(model_uri, uri, device))
    data = dataset.load(data_dir, dataset.splits[0])
    classes = tuple(getattr(model, "classes", data.classes))
    if len(classes) != len(data.classes):
        raise UserError(f"the model predicts {len(classes)} classes, {dataset.name} has "
                        f"{len(data.classes)}")
    if "target" in given:
        given = {**given, "target": resolve_target(given["target"], classes)}
    options = resolve_options(attack, given)
    run_attack = attack.build(model, **options)
    fixed = options.get("target")
    skip = fixed if isinstance(fixed, int) and not isinstance(fixed, bool) else None
    predicted = logits_of(model, data.test_images, device).argmax(1)
    indices = choose(predicted, data.test_labels, classes, how, seed, skip)

    tags = {"cifarx.attack": attack.name, "cifarx.model_uri": model_uri,
            "cifarx.dataset": dataset.name, "cifarx.device": str(device),
            "cifarx.version": __version__}
    if source_run_id(model_uri):
        tags["cifarx.source_run"] = source_run_id(model_uri)
    params = {"attack": attack.name, **{f"attack.{k}": v for k, v in options.items()},
              "model": model_uri, "dataset": dataset.name, "data_dir": str(data_dir),
              "images": len(indices), "selection": how[0] if how[0] == "all"
              else f"{how[0]}={how[1]}", "seed": seed, "batch_size": batch_size,
              "device": str(device), "threads": torch.get_num_threads()}
    images, labels = data.test_images[indices], data.test_labels[indices]
    with start_run(uri, experiment, run_name or f"{attack.name} {model_uri}", tags) as run:
        if on_start is not None:
            on_start(len(indices))
        results, seconds = generate(run_attack, images, labels, device, batch_size, seed)
        adv_set = make_set(model, results, images, labels, indices, device, classes,
                           attack.name, options, model_uri, batch_size)
        metrics = summary(adv_set, seconds)
        log_attack(run, adv_set, metrics, params)
        experiment_id = run.experiment_id
    return Attacked(adv_set, metrics, run.id, experiment_id)


@dataclass
class Transferred:
    sources: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    cells: list[dict[str, Any]]
    run_id: str
    experiment_id: str


def transfer_command(refs: list[str], model_uris: list[str], device: torch.device, uri: str,
                     experiment: str, run_name: str | None) -> Transferred:
    """``cifarx transfer``: each stored set against each target model, logged as one run."""
    import mlflow

    refs, model_uris = list(dict.fromkeys(refs)), list(dict.fromkeys(model_uris))
    sets = [load_set(ref, uri) for ref in refs]
    models = [prepare(load_model(m, uri, device)) for m in model_uris]
    for ref, adv_set in zip(refs, sets):
        for m, model in zip(model_uris, models):
            classes = getattr(model, "classes", None)
            if classes is not None and len(classes) != len(adv_set["classes"]):
                raise UserError(f"--model {m} predicts {len(classes)} classes; the set of "
                                f"{ref} has {len(adv_set['classes'])}")
    client = mlflow.MlflowClient(uri)
    keys: set[str] = set()
    sources = [{"key": short_key(ref, keys), "ref": ref, "attack": s["attack"],
                "model_uri": s["model_uri"], "images": len(s["labels"])}
               for ref, s in zip(refs, sets)]
    for source in sources:
        source["label"] = f"{source['attack']} {source['key']} on " \
                          f"{describe_model(source['model_uri'], client)}"
    targets = [{"key": short_key(m, keys), "model_uri": m, "label": describe_model(m, client)}
               for m in model_uris]
    tags = {"cifarx.adversarial_runs": ",".join(refs), "cifarx.target_models": ",".join(model_uris),
            "cifarx.device": str(device), "cifarx.version": __version__}
    if len(refs) == 1:
        tags["cifarx.source_run"] = refs[0]
    name = run_name or f"transfer {len(refs)} set(s) to {len(model_uris)} model(s)"
    with start_run(uri, experiment, name, tags) as run:
        run.log_params({**{f"adversarial.{s['key']}": s["ref"] for s in sources},
                        **{f"model.{t['key']}": t["model_uri"] for t in targets},
                        "device": str(device)})
        cells = [{"source": s["key"], "target": t["key"], **transfer_scores(adv_set, model, device)}
                 for s, adv_set in zip(sources, sets) for t, model in zip(targets, models)]
        log_transfer(run, sources, targets, cells)
        experiment_id = run.experiment_id
    return Transferred(sources, targets, cells, run.id, experiment_id)
