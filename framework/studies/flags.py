"""A study changed by the command line: ``--set`` and ``--grid`` (which win over every table
of the file), ``--seeds``, ``--metric`` and the like, and ``--baseline``; each result is
checked as the file's own keys are."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Mapping

from ..errors import UserError
from ..plugin_api import options as opts
from .study import Study, check, field_name, is_list


def overrides(study: Study, **given: Any) -> Study:
    """The study with command-line flags applied (those given, i.e. not None)."""
    changes = {k: v for k, v in given.items() if v is not None}
    if isinstance(changes.get("seeds"), int):
        changes["seeds"] = tuple(range(changes["seeds"]))
    updated = replace(study, **changes)
    check(updated, "study")
    return updated


def with_flags(raw: Mapping[str, Any], grid: list[str], fixed: list[str]) -> dict[str, Any]:
    """``--grid KEY=V1,V2`` and ``--set KEY=VALUE`` added to a study's raw form (the flags win
    over the file: the key leaves whichever of [train], [grid], [random] and
    [[configurations]] the file gave it in)."""
    raw = {**raw, "grid": dict(raw.get("grid", {})), "train": dict(raw.get("train", {})),
           "random": dict(raw.get("random", {})),
           "configurations": [dict(p) for p in raw.get("configurations", [])]}
    added: set[str] = set()
    for flag, texts in (("--grid", grid), ("--set", fixed)):
        for text in texts:
            try:
                key, value = opts.split_assignment(text)
            except ValueError:
                raise UserError(f"{flag} {text!r}: expected KEY=VALUE"
                                + (",VALUE..." if flag == "--grid" else "")) from None
            field_name(key, flag)
            for table in ("train", "grid", "random"):
                if not (flag == "--grid" and table == "grid"):
                    raw[table].pop(key, None)
            for point in raw["configurations"]:
                point.pop(key, None)
            if flag == "--set":
                raw["train"][key] = value
                continue
            values = [value] if is_list(key) else [v.strip() for v in value.split(",")]
            if key not in added:  # the first --grid KEY replaces the file's axis
                raw["grid"][key], _ = [], added.add(key)
            raw["grid"][key] += values
    # configurations that differed only in a key the flags took over are one now
    unique = {json.dumps(p, sort_keys=True, default=str): p for p in raw["configurations"]}
    raw["configurations"] = list(unique.values()) if any(unique.values()) else []
    return raw


def with_baseline(study: Study, texts: list[str]) -> Study:
    """``--baseline KEY=VALUE`` (each a text) as the study's baseline, checked as the file's
    would be; a value names the grid's value it matches (``0.1`` the grid's float 0.1,
    ``normalize,flip`` the list ``["normalize", "flip"]``)."""
    from .compare import same_value

    chosen: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--baseline {text!r}: expected KEY=VALUE")
        key, value = key.strip(), value.strip()
        grid = [v for v in study.grid.get(key, ()) if same_value(value, opts.show(v))]
        chosen[key] = grid[0] if grid else value
    updated = replace(study, baseline=chosen)
    check(updated, "--baseline")
    return updated
