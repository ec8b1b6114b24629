"""Models saved as weights and a recipe, loaded back without unpickling anything.

A logged cifarx model holds, next to MLflow's pickle (kept for ``mlflow.pytorch.load_model``),
two files in its ``extra_files/``: ``weights.safetensors`` (tensors only) and ``recipe.json``
(which plugins built the network, with which options, for which images and classes). cifarx
loads a model by rebuilding the network from the installed plugins and filling in the
weights: loading a model can no longer run code that whoever logged it put in its pickle.

A pickle is loaded only when the user says they trust it (``--trust-pickle`` or
``CIFARX_TRUST_PICKLE=1``): a model from another tool, or one logged before cifarx wrote
recipes.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..plugin_api.registry import Catalog

WEIGHTS = "weights.safetensors"
RECIPE = "recipe.json"
FORMAT = "cifarx-model/1"
TRUST_ENV = "CIFARX_TRUST_PICKLE"

_rebuilding = contextvars.ContextVar("cifarx_rebuilding", default=False)


def rebuilding() -> bool:
    """True while cifarx rebuilds a saved network to load its weights into it.

    An architecture's ``build`` that fetches pretrained weights should skip the fetch then:
    the saved weights replace them, and the machine that loads the model may be offline.
    """
    return _rebuilding.get()


@contextlib.contextmanager
def _as_rebuild() -> Iterator[None]:
    token = _rebuilding.set(True)
    try:
        yield
    finally:
        _rebuilding.reset(token)


def recipe(arch: str, arch_options: Mapping[str, Any], normalize: str,
           normalize_options: Mapping[str, Any], input_shape: tuple[int, int, int],
           classes: tuple[str, ...], plugins: Mapping[str, str]) -> dict[str, Any]:
    """What rebuilding a trained Classifier takes: the architecture and the normalization
    plugins with their options, the input shape (C, H, W) and the class names; ``plugins``
    (name -> package==version) says where they came from."""
    return {"format": FORMAT, "architecture": arch, "arch_options": dict(arch_options),
            "normalize": normalize, "normalize_options": dict(normalize_options),
            "input_shape": list(input_shape), "classes": list(classes),
            "plugins": dict(plugins)}


def save(model: nn.Module, recipe: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write the weights and the recipe into ``folder``; the two paths."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    weights, spec = folder / WEIGHTS, folder / RECIPE
    save_model(model, str(weights))  # handles tied weights, which save_file refuses
    spec.write_text(json.dumps(recipe, indent=2, sort_keys=True))
    return [weights, spec]


def trusted(trust_pickle: bool = False) -> bool:
    return trust_pickle or os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes")


def load(folder: Path, label: str, catalog: Catalog, device: torch.device | str = "cpu",
         trust_pickle: bool = False) -> nn.Module:
    """The model in the MLflow model folder ``folder`` (downloaded), in eval mode.

    From its weights and recipe when it has them; else (a pickle only) with ``trust_pickle``,
    else a :class:`UserError` saying why not. ``label`` names the model in messages.
    """
    import torch

    spec_file = folder / "extra_files" / RECIPE
    if spec_file.is_file():
        return rebuild(json.loads(spec_file.read_text()), folder / "extra_files" / WEIGHTS,
                       label, catalog, torch.device(device))
    if not trusted(trust_pickle):
        raise UserError(f"{label}: this model has no cifarx weights file (another tool or an "
                        "older cifarx logged it), only a pickle, and unpickling runs whatever code "
                        "its author put in it; if you trust who logged it, pass --trust-pickle "
                        f"(or set {TRUST_ENV}=1)")
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(str(folder), map_location=torch.device(device))
    except Exception as exc:  # trusted, but not a model this torch can read back
        raise UserError(f"{label}: its pickle does not load as a PyTorch model "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                        ) from None


def stored_options(plugin, kind: str, stored: Mapping[str, Any], label: str) -> dict[str, Any]:
    """A recipe's options as the installed plugin takes them: each value converted through the
    option's current declaration (an older plugin may have stored ``"32"`` for an int), options
    the plugin no longer declares left out with a warning, new ones at their defaults."""
    from ..plugin_api.options import convert, show

    values = {}
    for name, value in stored.items():
        option = plugin.options.get(name)
        if option is None:
            warn(f"{label}: its {kind} {plugin.name!r} was saved with the option {name}="
                 f"{show(value)}, which the installed plugin no longer has; left out")
            continue
        try:
            values[name] = value if value is None else convert(option, value)
        except ValueError as exc:
            raise UserError(f"{label}: cannot be rebuilt: its {kind} option {name}="
                            f"{show(value)} is not accepted by the installed {plugin.name} "
                            f"({exc})") from None
    return values


def warn(message: str):
    import sys

    print(f"cifarx: warning: {message}", file=sys.stderr)


def check_versions(spec: Mapping[str, Any], catalog: Catalog, label: str):
    """One warning per plugin whose installed version differs from the one that saved it."""
    for key, saved in (spec.get("plugins") or {}).items():
        kind, _, name = key.partition(".")
        try:
            now = "==".join(filter(None, catalog.origin(kind, name)))
        except (UserError, ValueError):
            continue  # not installed: rebuild says so
        if saved and now and saved != now:
            warn(f"{label} was saved with {saved}; {now} is installed (its options are read "
                 "through the installed declarations)")


def rebuild(spec: Mapping[str, Any], weights: Path, label: str, catalog: Catalog,
            device: torch.device) -> nn.Module:
    """Build the recipe's network from the installed plugins and load the weights into it."""
    import torch
    from safetensors.torch import load_model

    from ..training.model import Classifier

    if spec.get("format") != FORMAT:
        raise UserError(f"{label}: saved as {spec.get('format')!r}, this cifarx reads {FORMAT}")
    channels, height, width = spec["input_shape"]
    classes = tuple(spec["classes"])
    try:
        arch = catalog.get("architecture", spec["architecture"])
        normalize = catalog.get("augmentation", spec["normalize"])
    except UserError as exc:
        raise UserError(f"{label}: built with a plugin that is not installed here ({exc}); "
                        f"it came from {spec.get('plugins') or 'an unknown package'}") from None
    check_versions(spec, catalog, label)
    arch_options = stored_options(arch, "architecture", spec["arch_options"], label)
    normalize_options = stored_options(normalize, "augmentation", spec["normalize_options"],
                                       label)
    try:
        with _as_rebuild():
            net = arch.build(num_classes=len(classes), in_channels=channels, image_size=height,
                             **arch_options)
            scaling = normalize.fit(torch.zeros(1, channels, height, width, dtype=torch.uint8),
                                    **normalize_options)
    except UserError:
        raise
    except Exception as exc:  # the recipe and the installed plugin disagree
        raise UserError(f"{label}: cannot be rebuilt: the installed {spec['architecture']} "
                        f"refused its recipe ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    model = Classifier(scaling, net, classes)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as exc:  # a shape that differs, a damaged file
        raise UserError(f"{label}: its weights do not fit the network the installed plugins "
                        f"build ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(f"{label}: its weights do not fit the network the installed plugins "
                        f"build (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]});"
                        " was the plugin package updated since?")
    return model.to(device).eval()
