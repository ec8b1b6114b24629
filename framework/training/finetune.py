"""Transfer learning: start from a trained model's weights (``--init-from``), train only some
of the parameters (``--freeze``), and give the backbone its own learning rate
(``--lr-backbone``).

Feature extraction is ``--freeze backbone``: every parameter but the classifier head's stays
as it was loaded (a timm model's ``get_classifier()``; else the last layer with parameters),
and a frozen BatchNorm keeps its running statistics too. Fine-tuning is ``--lr-backbone``: the
head trains at ``--lr``, the rest at the smaller rate, both following the schedule.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from ..errors import UserError

BACKBONE = "backbone"  # --freeze's word for every parameter but the head's


def check(freeze: tuple[str, ...], lr_backbone: float | None):
    """The flags alone (before any model is built)."""
    if lr_backbone is not None and not lr_backbone >= 0:
        raise UserError(f"--lr-backbone must be >= 0 (0 freezes it), got {lr_backbone}")
    if any(not pattern.strip() for pattern in freeze):
        raise UserError("--freeze: an empty pattern; accepted: 'backbone' or glob patterns of "
                        "parameter names (features.*, conv1.weight; `cifarx describe "
                        "architecture NAME` lists the layers)")


def head_names(net: nn.Module) -> set[str]:
    """The parameter names of the classifier head: timm's ``get_classifier()`` when the
    network has one, else the last module (in registration order) that holds parameters."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        ids = {id(p) for p in head.parameters()}
        return {name for name, p in net.named_parameters() if id(p) in ids}
    last = None
    for name, module in net.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    return {f"{last}.{n}" if last else n for n, _ in
            (net.get_submodule(last) if last else net).named_parameters(recurse=False)}


def frozen_names(net: nn.Module, freeze: tuple[str, ...]) -> set[str]:
    """The parameters ``freeze`` names: ``backbone``, or glob patterns of parameter names.
    A pattern that names none is an error listing a few names (a misspelling trains
    everything silently otherwise)."""
    names = [name for name, _ in net.named_parameters()]
    head = head_names(net)
    chosen: set[str] = set()
    for pattern in freeze:
        if pattern == BACKBONE:
            found = {n for n in names if n not in head}
        else:
            found = {n for n in names if fnmatch.fnmatchcase(n, pattern)
                     or fnmatch.fnmatchcase(n, f"{pattern}.*")}
        if not found:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(f"--freeze {pattern}: no parameter matches; the network's are "
                            f"{shown} (glob patterns; 'backbone': all but the head)")
        chosen |= found
    if chosen >= set(names):
        raise UserError(f"--freeze {','.join(freeze)} freezes every parameter: nothing would "
                        "train")
    return chosen


def apply(net: nn.Module, freeze: tuple[str, ...]) -> set[str]:
    """Freeze what ``freeze`` names: no gradient, and a BatchNorm whose parameters are all
    frozen keeps its running statistics (momentum 0). The frozen names."""
    names = frozen_names(net, freeze) if freeze else set()
    for name, p in net.named_parameters():
        if name in names:
            p.requires_grad_(False)
    for module_name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{module_name}.{n}" if module_name else n
                   for n, _ in module.named_parameters(recurse=False)]
            if own and all(n in names for n in own):
                module.momentum = 0.0
    return names


def param_groups(model: nn.Module, lr: float, lr_backbone: float | None
                 ) -> list[dict[str, Any]]:
    """The optimizer's parameter groups of a model (a :class:`~cifarx.training.model.Classifier`
    or a bare network): the trainable parameters at ``lr``; with ``lr_backbone``, those of the
    network outside its head at that rate."""
    net = getattr(model, "net", model)
    prefix = "net." if net is not model else ""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lr_backbone is None:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    body = {prefix + n for n in {n for n, _ in net.named_parameters()} - head_names(net)}
    head = {n for n, _ in trainable if n not in body}
    groups = [{"params": [p for n, p in trainable if n in head], "lr": lr},
              {"params": [p for n, p in trainable if n not in head], "lr": lr_backbone}]
    return [g for g in groups if g["params"]]


def counts(net: nn.Module) -> dict[str, int]:
    """The params a training run logs: its parameters, and how many of them train."""
    total = sum(p.numel() for p in net.parameters())
    return {"parameters": total,
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad)}


def init_from(net: nn.Module, uri: str, tracking_uri: str) -> dict[str, list[str]]:
    """Load the weights of the model at ``uri`` (``runs:/ID/model``, ``models:/NAME/N``, a
    model folder) into ``net``, tensor by tensor where name and shape agree: a head for
    another number of classes (CIFAR-10 -> CIFAR-100) keeps its fresh initialization.
    Returns the names ``loaded`` and ``skipped``; none loaded is an error (another
    architecture)."""
    import torch

    from ..tracking.common import tracking_uri as resolve
    from ..tracking.models import load_model

    try:
        source = load_model(uri, resolve(tracking_uri))
    except UserError as exc:
        raise UserError(str(exc).replace(f"--model {uri}", f"--init-from {uri}", 1)) from None
    theirs = getattr(source, "net", source).state_dict()
    mine = net.state_dict()
    loaded = [k for k, v in theirs.items() if k in mine and mine[k].shape == v.shape]
    if not loaded:
        raise UserError(f"--init-from {uri}: none of its weights fit this architecture (its "
                        f"layers: {', '.join(list(theirs)[:4])}, ...; this one's: "
                        f"{', '.join(list(mine)[:4])}, ...); start from a model of the same "
                        "architecture")
    with torch.no_grad():
        for k in loaded:
            mine[k].copy_(theirs[k])
    return {"loaded": loaded, "skipped": [k for k in mine if k not in set(loaded)]}
