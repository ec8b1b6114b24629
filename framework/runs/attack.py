"""``cifarx attack``: an attack plugin run on a trained model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import UserError
from ..inference import adversarial
from ..inference.predict import predict
from ..plugin_api.options import OptionError, flag_label, params as option_params, reword, show
from ..plugin_api.registry import Catalog, catalog as default_catalog
from ..tracking.models import load_model
from ..training.config import resolve_plugin_options
from ..training.data import resolve_data_dir, resolve_device
from .common import (Tracking, linked, load_test_data, log_test_set, model_classes, model_dataset,
                     model_run, run_tags)


# --- attacks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackConfig:
    """``cifarx attack``. ``attack_options`` are ``NAME=VALUE`` texts; ``option_flags`` names
    the flag that set an option when it is not ``--attack-opt`` (``{"eps": "--eps"}``)."""

    model: str
    attack: str = "ifgsm"
    attack_options: tuple[str, ...] = ()
    option_flags: Mapping[str, str] = field(default_factory=dict)
    per_class: int | None = None
    count: int | None = None
    all_test: bool = False
    replace: bool = True  # --per-class: an image that fails is replaced by the next of its class
    batch_size: int = 500
    dataset: str | None = None  # None: the dataset the model was trained on
    data_dir: str | None = None
    dataset_options: tuple[str, ...] = ()
    device: str = "auto"
    seed: int = 0
    trust_pickle: bool = False


@dataclass
class AttackRun:
    adv_set: dict[str, Any]
    metrics: dict[str, float]
    run_id: str
    experiment_id: str


def attack_run(config: AttackConfig, tracking: Tracking = Tracking(),
               catalog: Catalog | None = None,
               on_start: Callable[[int, torch.device], None] | None = None) -> AttackRun:
    """Adversarial images for test images the model gets right: every check first, then one
    run linked to the model's run. ``on_start`` hears how many images, once the run is open."""
    catalog = catalog or default_catalog()
    attack = catalog.get("attack", config.attack)
    how = adversarial.selection(config.per_class, config.count, config.all_test)
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    label = lambda name: config.option_flags.get(name) or flag_label(  # noqa: E731
        "--attack-opt", None, name)
    values = resolve_plugin_options("attack", attack, config.attack_options, label)
    device = resolve_device(config.device)
    uri = tracking.resolved_uri
    model = adversarial.for_attack(load_model(config.model, uri, device, config.trust_pickle,
                                              catalog))
    dataset_name = config.dataset or model_dataset(config.model, uri)
    dataset, data, dataset_values = load_test_data(catalog, dataset_name, config.data_dir,
                                                   config.dataset_options)
    classes, data = model_classes(model, data)
    if values.get("target") is not None:
        values["target"] = adversarial.resolve_target(values["target"], classes,
                                                      label("target"))
    try:
        run_attack = attack.build(model, **values)
    except OptionError as exc:
        raise reword(exc, label, values) from None
    fixed = values.get("target")
    skip = fixed if isinstance(fixed, int) and not isinstance(fixed, bool) else None
    predicted = predict(model, data.test_images, device).argmax(1).cpu()
    indices, spares = adversarial.choose(predicted, data.test_labels, classes, how, config.seed,
                                         skip)
    if not config.replace:
        spares = {}

    source = model_run(config.model, uri)
    tags = run_tags(device, catalog, [("attack", attack.name), ("dataset", dataset.name)],
                    attack=attack.name, model_uri=config.model, dataset=dataset.name,
                    source_run=source.info.run_id if source else None)
    params = {"attack": attack.name, **option_params("attack", values),
              "model": config.model, "dataset": dataset.name,
              "data_dir": str(resolve_data_dir(config.data_dir)),
              "images": len(indices), "selection": how[0] if how[0] == "all"
              else f"{how[0]}={how[1]}", "seed": config.seed, "batch_size": config.batch_size,
              "replace": show(config.replace and how[0] == "per_class"),
              "device": str(device), "threads": torch.get_num_threads(),
              **option_params("dataset", dataset_values)}
    with tracking.open(f"{attack.name} {config.model}", tags,
                       f"{attack.name} attack on {len(indices)} {dataset.name} test images "
                       f"against the model of {linked(config.model, source)}") as run:
        log_test_set(run, dataset, data)
        if on_start is not None:
            on_start(len(indices), device)
        result, indices, replaced, seconds = adversarial.attack_images(
            run_attack, data.test_images, data.test_labels, indices, spares, device,
            config.batch_size, config.seed)
        images, labels = data.test_images[indices], data.test_labels[indices]
        adv_set = adversarial.make_set(model, [result], images, labels, indices, device, classes,
                                       attack.name, values, config.model, len(indices))
        metrics = {**adversarial.summary(adv_set, seconds), "attack/replaced": replaced}
        adversarial.log_attack(run, adv_set, metrics, params)
        experiment_id = run.experiment_id
    return AttackRun(adv_set, metrics, run.id, experiment_id)
