"""A study expanded into its configurations (the grid's corners first, random draws
seeded), each with its key: the digest a sweep finds its trials by.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import asdict
from typing import Any, Mapping

from ..plugin_api import options as opts
from ..training.config import TrainConfig
from ..errors import UserError
from .study import Configuration, Study, apply, coerce, field_name


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_key(config: TrainConfig) -> str:
    """A training's identity in a sweep: the digest of the options it sets to other than their
    defaults. A new cifarx option (with its default) leaves every key as it was, so a sweep
    started before it still resumes."""
    default = type(config)()
    return digest({name: value for name, value in asdict(config).items()
                   if value != getattr(default, name)})


def configurations(study: Study, points: list[dict[str, Any]] | None = None
                   ) -> list[Configuration]:
    """Every configuration of the study (seed 0): the grid's combinations, or ``trials``
    random draws (seeded by ``search-seed``); or those of ``points`` (axis -> value), e.g. a
    tpe search's."""
    explicit = points is not None
    if explicit:
        pass
    elif study.search == "grid":
        keys = list(study.grid)
        grid = [dict(zip(keys, values)) for values in
                itertools.product(*(study.grid[k] for k in keys))] if keys else [{}]
        points = [{**listed, **point} for listed in (study.configurations or [{}])
                  for point in grid]
    elif study.search == "tpe":
        points = corners(study)
    else:
        points = []
        rng = random.Random(study.search_seed)
        for _ in range(study.trials):
            point = {k: rng.choice(v) for k, v in study.grid.items()}
            point.update({k: draw(rng, spec) for k, spec in study.random.items()})
            points.append(point)
    found = []
    for i, point in enumerate(points):
        axes, settings = in_use(study, point)
        where = "study, configuration " + (", ".join(f"{k}={opts.show(v)}"
                                                     for k, v in axes.items()) or str(i))
        config = apply(settings, where)
        found.append(Configuration(config_key(config), axes, config))
    if explicit:
        return found
    # the same training twice (a random draw repeated, an option dropped by in_use) would
    # run twice and count its seeds twice in the statistics
    unique: dict[str, Configuration] = {}
    for configuration in found:
        unique.setdefault(configuration.key, configuration)
    return list(unique.values())


PLUGIN_LISTS = {"aug-opt": "aug", "probe-opt": "probe"}  # where PLUGIN.NAME's plugins are named
ALWAYS_USED = {"aug-opt": {"normalize"}}  # in a pipeline even where aug does not name it


def in_use(study: Study, point: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A configuration's axes and all its settings ([train] and axes), less the options of a
    plugin it does not use though another configuration of the study does (``aug-opt.flip.p``
    where ``aug`` has no flip): the value would mean nothing there, and logged as an axis it
    would look as if it mattered. An option of a plugin no configuration uses stays (the plan
    refuses it: a misspelling)."""
    settings = {**study.train, **point}
    dropped = set()
    for key in settings:
        head, _, rest = key.partition(".")
        if head not in PLUGIN_LISTS:
            continue
        plugin, names = rest.split(".")[0], PLUGIN_LISTS[head]
        used = _names(names, settings.get(names, getattr(TrainConfig, field_name(names, "study"))))
        if plugin not in used and plugin not in ALWAYS_USED.get(head, ()) and \
                plugin in _named_anywhere(study, names):
            dropped.add(key)
    return ({k: v for k, v in point.items() if k not in dropped},
            {k: v for k, v in settings.items() if k not in dropped})


def _names(key: str, value: Any) -> set[str]:
    if isinstance(value, tuple):  # TrainConfig's default
        return set(value)
    try:
        return set(coerce(key, value, "study"))
    except UserError:
        return set()  # the plan says what is wrong with it


def _named_anywhere(study: Study, key: str) -> set[str]:
    """Every plugin the study's ``aug`` (or ``probe``) names, in any table, or its default."""
    values = [*study.grid.get(key, []), *[p[key] for p in study.configurations if key in p]]
    values += study.random.get(key, {}).get("choice", [])
    values.append(study.train.get(key, getattr(TrainConfig, field_name(key, "study"))))
    return set().union(*(_names(key, v) for v in values)) if values else set()


def corners(study: Study) -> list[dict[str, Any]]:
    """Points that check a search space before a model-based search picks from it: every
    choice and both ends of every range, each with the other axes at their first value."""
    ends = {k: list(v) for k, v in study.grid.items()}
    for key, spec in study.random.items():
        kind, args = next(iter(spec.items()))
        ends[key] = list(args) if kind == "choice" else \
            [int(a) for a in args] if kind == "int" else [float(a) for a in args]
    first = {k: v[0] for k, v in ends.items()}
    points = [first]
    for key, values in ends.items():
        points += [{**first, key: v} for v in values[1:]]
    return points


def draw(rng: random.Random, spec: Mapping[str, list]) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(args)
    if kind == "int":
        return rng.randint(int(args[0]), int(args[1]))
    if kind == "uniform":
        return rng.uniform(float(args[0]), float(args[1]))
    return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
