"""``cifarx transfer``: an attack run's adversarial images scored on other models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..inference import adversarial, transfer
from ..tracking.models import load_model
from ..training.data import resolve_device
from .common import Tracking, run_tags


# --- transfer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferConfig:
    adversarial: tuple[str, ...]  # attack run ids, or set.pt files
    models: tuple[str, ...]  # target model URIs
    device: str = "auto"
    trust_pickle: bool = False


@dataclass
class TransferRun:
    sources: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    cells: list[dict[str, Any]]
    run_id: str
    experiment_id: str


def transfer_run(config: TransferConfig, tracking: Tracking = Tracking()) -> TransferRun:
    """Each stored set against each target model, logged as one run."""
    import mlflow

    uri = tracking.resolved_uri
    device = resolve_device(config.device)
    refs, model_uris = list(dict.fromkeys(config.adversarial)), list(dict.fromkeys(config.models))
    sets = [transfer.load_set(ref, uri) for ref in refs]
    models = [adversarial.for_attack(load_model(m, uri, device, config.trust_pickle))
              for m in model_uris]
    for ref, adv_set in zip(refs, sets):
        for m, model in zip(model_uris, models):
            classes = getattr(model, "classes", None)
            if classes is not None and len(classes) != len(adv_set["classes"]):
                raise UserError(f"--model {m} predicts {len(classes)} classes; the set of "
                                f"{ref} has {len(adv_set['classes'])}")
    client = mlflow.MlflowClient(uri)
    keys: set[str] = set()
    sources = [{"key": transfer.short_key(ref, keys), "ref": ref, "attack": s["attack"],
                "model_uri": s["model_uri"], "images": len(s["labels"])}
               for ref, s in zip(refs, sets)]
    for source in sources:
        source["label"] = f"{source['attack']} {source['key']} on " \
                          f"{transfer.describe_model(source['model_uri'], client)}"
    targets = [{"key": transfer.short_key(m, keys), "model_uri": m,
                "label": transfer.describe_model(m, client)} for m in model_uris]
    tags = run_tags(device, adversarial_runs=",".join(refs), target_models=",".join(model_uris),
                    source_run=refs[0] if len(refs) == 1 else None)
    with tracking.open(f"transfer {len(refs)} set(s) to {len(model_uris)} model(s)", tags,
                       f"Adversarial sets {', '.join(refs)} fed to "
                       f"{', '.join(model_uris)}") as run:
        run.log_params({**{f"adversarial.{s['key']}": s["ref"] for s in sources},
                        **{f"model.{t['key']}": t["model_uri"] for t in targets},
                        "device": str(device)})
        cells = [{"source": s["key"], "target": t["key"],
                  **transfer.transfer_scores(adv_set, model, device)}
                 for s, adv_set in zip(sources, sets) for t, model in zip(targets, models)]
        transfer.log_transfer(run, sources, targets, cells)
        experiment_id = run.experiment_id
    return TransferRun(sources, targets, cells, run.id, experiment_id)
