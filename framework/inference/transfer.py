"""Stored adversarial sets read back: by ``cifarx transfer`` (other models' accuracy on them)
and by ``cifarx train --adv-data`` (extra training images)."""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..tracking.common import quiet_mlflow
from ..tracking.run import Run
from .adversarial import SET_ARTIFACT, SET_KEYS
from .predict import predict


def load_set(ref: str, uri: str, flag: str = "--adversarial") -> dict[str, Any]:
    """The set of an attack run (its id), or a set.pt file; ``flag`` starts the messages."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = Path(ref).expanduser()
    if path.suffix == ".pt" and path.is_file():
        return read_set(path, ref, flag)
    quiet_mlflow()
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

    The images stay float32, as the attack made them (see
    :class:`cifarx.training.data.TrainingImages`).
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
    clean = predict(model, adv_set["images"], device).argmax(1).cpu()
    adv = predict(model, adv_set["adv_images"], device).argmax(1).cpu()
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
    from ..figures import transfer_matrix

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
