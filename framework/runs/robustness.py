"""``cifarx attack --robust-accuracy``: a model's robust accuracy against the radius ``eps``.

The first ``count`` test images; at each ``eps``, the attack runs on those the model gets
right, and an image counts as robust when the model still classifies its adversarial version
correctly (checked here, not taken from the attack's own report) and that version is within
``eps`` of it (L-inf, or L2 for an attack whose ``norm`` option is 2). ``eps`` 0 is the clean
accuracy. The attack must take ``eps`` as a radius (``autoattack``, ``pgd``, ``fgsm``): one
that leaves the ball (``ifgsm``'s ``eps`` is a step size) is refused before any run opens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import UserError
from ..inference import adversarial
from ..inference.predict import predict
from ..plugin_api.options import (OptionError, flag_label, params as option_params, parse_number,
                                  reword)
from ..plugin_api.registry import Catalog, catalog as default_catalog
from ..tracking.models import load_model
from ..training.config import resolve_plugin_options
from ..training.data import resolve_data_dir, resolve_device
from .common import Tracking, linked, load_test_data, log_test_set, model_classes, model_dataset, \
    model_run, run_tags

CURVE_ARTIFACT = "robust/curve.json"
TOLERANCE = 1e-5  # float32 rounding at the ball's edge


@dataclass(frozen=True)
class RobustnessConfig:
    model: str
    eps: tuple[str, ...]  # as typed: "0", "2/255", "0.03"
    attack: str = "autoattack"
    attack_options: tuple[str, ...] = ()
    count: int = 500  # the first test images
    batch_size: int = 250
    dataset: str | None = None
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    seed: int = 0
    trust_pickle: bool = False


@dataclass
class RobustnessRun:
    curve: list[dict[str, Any]]  # per eps: eps, text, robust_acc, seconds
    clean_acc: float
    run_id: str
    experiment_id: str


def radii(texts: tuple[str, ...]) -> list[tuple[str, float]]:
    """``--eps`` as (text, value) pairs, increasing; each a number or fraction in [0, 1]."""
    found = []
    for text in texts:
        try:
            value = parse_number(text)
        except (ValueError, ZeroDivisionError):
            value = None
        if value is None or not 0 <= value <= 1:
            raise UserError(f"--eps {text}: accepted: radii in [0, 1], as numbers or fractions "
                            "(0,1/255,2/255,8/255)")
        found.append((text, value))
    if not found:
        raise UserError("--robust-accuracy needs --eps: a comma list of radii (0,2/255,8/255)")
    return sorted(found, key=lambda pair: pair[1])


def robustness_run(config: RobustnessConfig, tracking: Tracking = Tracking(),
                   catalog: Catalog | None = None,
                   on_eps: Callable[[str, float, float], None] | None = None) -> RobustnessRun:
    """Every check first (options at each radius, a trial attack that must stay in the ball),
    then one run; ``on_eps(text, robust accuracy, seconds)`` hears each radius."""
    catalog = catalog or default_catalog()
    attack = catalog.get("attack", config.attack)
    if "eps" not in attack.options:
        raise UserError(f"--robust-accuracy: the attack {attack.name} has no eps option; use "
                        "one that takes a radius: autoattack, pgd, fgsm")
    if config.count < 1:
        raise UserError(f"--count must be at least 1, got {config.count}")
    eps = radii(config.eps)
    device = resolve_device(config.device)
    uri = tracking.resolved_uri
    model = adversarial.for_attack(load_model(config.model, uri, device, config.trust_pickle,
                                              catalog))
    dataset_name = config.dataset or model_dataset(config.model, uri)
    dataset, data, dataset_values = load_test_data(catalog, dataset_name, config.data_dir,
                                                   config.dataset_options)
    _, data = model_classes(model, data)
    images = data.test_images[:config.count]
    labels = data.test_labels[:config.count]
    right = predict(model, images, device).argmax(1).cpu() == labels
    builds = {}
    for text, value in eps:
        if value == 0:
            continue
        values = resolve_plugin_options("attack", attack, (*config.attack_options,
                                                           f"eps={text}"), _label)
        try:
            builds[text] = (attack.build(model, **values), values)
        except OptionError as exc:
            raise reword(exc, _label, values) from None
    _check_bounded(attack.name, builds, images[:2], labels[:2], device, config.seed)

    source = model_run(config.model, uri)
    tags = run_tags(device, catalog, [("attack", attack.name), ("dataset", dataset.name)],
                    attack=attack.name, model_uri=config.model, dataset=dataset.name,
                    source_run=source.info.run_id if source else None)
    options = next(iter(builds.values()))[1] if builds else {}
    params = {"attack": attack.name, **option_params("attack", options),
              "attack.eps": ",".join(text for text, _ in eps), "robust_accuracy": "true",
              "model": config.model, "dataset": dataset.name, "images": len(labels),
              "data_dir": str(resolve_data_dir(config.data_dir)), "seed": config.seed,
              "batch_size": config.batch_size, "device": str(device),
              "threads": torch.get_num_threads(), **option_params("dataset", dataset_values)}
    with tracking.open(f"robust accuracy {attack.name} {config.model}", tags,
                       f"robust accuracy of the model of {linked(config.model, source)} "
                       f"against {attack.name} on the first {len(labels)} {dataset.name} "
                       f"test images, eps {', '.join(t for t, _ in eps)}") as run:
        log_test_set(run, dataset, data)
        run.log_params(params)
        clean = right.float().mean().item()
        curve = []
        for step, (text, value) in enumerate(eps):
            start = time.perf_counter()
            robust = right.clone()
            if value > 0 and right.any():
                run_attack, values = builds[text]
                robust[right] = _survives(run_attack, model, images[right], labels[right], value,
                                          str(values.get("norm", "inf")), device,
                                          config.batch_size, config.seed)
            seconds = time.perf_counter() - start
            acc = robust.float().mean().item()
            curve.append({"eps": value, "text": text, "robust_acc": acc, "seconds": seconds})
            run.log_points([("robust/acc", acc, step, int(time.time() * 1000)),
                            ("robust/seconds", seconds, step, int(time.time() * 1000))])
            if on_eps is not None:
                on_eps(text, acc, seconds)
        run.log_points([("robust/clean_acc", clean, 0, int(time.time() * 1000))])
        run.log_dict({"attack": attack.name, "images": len(labels), "clean_acc": clean,
                      "curve": curve}, CURVE_ARTIFACT)
        run.log_figure(_figure(curve, attack.name, len(labels)),
                       "figures/robust_accuracy.png")
        experiment_id = run.experiment_id
    return RobustnessRun(curve, clean, run.id, experiment_id)


def _label(name: str) -> str:
    return "--eps" if name == "eps" else flag_label("--attack-opt", None, name)


def _uint8_to_float(images: torch.Tensor, device) -> torch.Tensor:
    return images.to(device).float().div_(255)


def _check_bounded(name: str, builds: dict, images, labels, device, seed: int):
    """A trial on two images at each radius: the attack must stay within it."""
    for text, (run_attack, values) in builds.items():
        x = _uint8_to_float(images, device)
        result = run_attack(x, labels.to(device), torch.Generator(device).manual_seed(seed))
        norm = str(values.get("norm", "inf"))
        if distance(result.images, x, norm).max().item() > values["eps"] + TOLERANCE:
            raise UserError(f"--robust-accuracy: {name} went beyond eps={text} (its eps is not "
                            "a radius); use an attack bounded by eps: autoattack, pgd, fgsm")


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per image, the L-inf (or, ``norm`` "2", L2) distance."""
    d = (a - b).flatten(1)
    return d.norm(dim=1) if norm == "2" else d.abs().amax(1)


def _survives(run_attack, model, images, labels, eps: float, norm: str, device, batch: int,
              seed: int) -> torch.Tensor:
    """Per image: the model still classifies its adversarial version right, within eps."""
    kept = []
    generator = torch.Generator(device).manual_seed(seed)
    for x, y in zip(images.split(batch), labels.split(batch)):
        x, y = _uint8_to_float(x, device), y.to(device)
        result = run_attack(x, y, generator)
        inside = distance(result.images, x, norm) <= eps + TOLERANCE
        with torch.no_grad():
            still = model(result.images.float().clamp(0, 1)).argmax(1) == y
        if not inside.all():
            raise UserError(f"the attack went beyond eps={eps:.6g} on {int((~inside).sum())} "
                            "images")
        kept.append(still.cpu())
    return torch.cat(kept)


def _figure(curve: list[dict[str, Any]], attack: str, n: int):
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = [c["eps"] * 255 for c in curve]
    ax.plot(x, [c["robust_acc"] for c in curve], marker="o")
    for c, xi in zip(curve, x):
        ax.annotate(f"{c['robust_acc']:.1%}", (xi, c["robust_acc"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("eps (L-inf, in 1/255)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"robust accuracy against {attack} ({n} test images)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
