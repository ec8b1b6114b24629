"""Study files: what a sweep runs, read from TOML (or built from command-line flags).

::

    experiment = "part1-seeds"          # MLflow experiment of the sweep and its trials
    seeds = 3                           # seeds 0, 1, 2 for every configuration (or a list)
    [train]                             # fixed options, named as in `cifarx train --help`
    arch = "table1"
    iters = 2000
    [grid]                              # each key: the values to try; every combination runs
    aug = ["raw", "normalize", "normalize,flip", "normalize,flip,crop"]
    lr = [0.05, 0.1]
    arch-opt.activation = ["relu", "silu"]

``[[configurations]]`` tables list configurations one by one (each combined with every point
of the grid, if there is one). ``search = "random"`` with ``trials = N`` draws N configurations
from ``[random]``, whose keys give ``{uniform = [a, b]}``, ``{log-uniform = [a, b]}``,
``{int = [a, b]}`` or ``{choice = [...]}``. ``search = "tpe"`` with ``trials = N`` lets Optuna's
TPE sampler choose N configurations from the same ranges (and the grid's values, as choices),
each from the results so far; ``pruner = "median"`` (its default) or ``"none"``, with
``pruner-startup`` and ``pruner-warmup``, stops poor trials early (see :mod:`cifarx.studies.sweep`).
Plugin options are keys of their own: ``arch-opt.NAME``, ``attack-opt.NAME``, ``dataset-opt.NAME``,
``aug-opt.PLUGIN.NAME``, ``probe-opt.PLUGIN.NAME``. Every trial is planned (every name and value
checked) before the sweep opens a run.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from ..plugin_api import options as opts
from ..training.config import TrainConfig

TOP_KEYS = {"experiment", "seeds", "search", "trials", "search-seed", "metric", "direction",
            "executor", "train", "grid", "random", "configurations", "pruner", "pruner-startup",
            "pruner-warmup", "baseline"}
SEARCHES = ("grid", "random", "tpe")
PRUNERS = ("median", "none")
PRUNER_STARTUP = 5  # configurations that complete before the median pruner prunes any
OPTION_KEYS = {"arch-opt": "arch_options", "attack-opt": "attack_options",
               "dataset-opt": "dataset_options", "aug-opt": "aug_options",
               "probe-opt": "probe_options"}
MULTI = {"aug-opt", "probe-opt"}  # PLUGIN.NAME=VALUE
FIELD_OF = {"probe": "probes"}  # study key -> TrainConfig field, where they differ
NOT_IN_STUDY = {"seed"}  # given by `seeds`
DISTRIBUTIONS = ("uniform", "log-uniform", "int", "choice")


@dataclass(frozen=True)
class Study:
    """A resolved study: fixed options, the axes and their values (or distributions), seeds."""

    experiment: str = "cifarx-sweep"
    seeds: tuple[int, ...] = (0,)
    search: str = "grid"
    trials: int | None = None  # random and tpe search: configurations drawn
    search_seed: int = 0
    metric: str = "final/test_acc"
    direction: str = "maximize"
    pruner: str | None = None  # tpe: "median" (None: its default) or "none"
    pruner_startup: int = PRUNER_STARTUP
    pruner_warmup: int | None = None  # iterations; None: a quarter of the fixed iters
    train: Mapping[str, Any] = field(default_factory=dict)  # study key -> value
    grid: Mapping[str, list] = field(default_factory=dict)
    random: Mapping[str, Mapping[str, list]] = field(default_factory=dict)
    configurations: tuple[Mapping[str, Any], ...] = ()  # listed one by one
    executor: Mapping[str, Any] = field(default_factory=dict)  # name= and its options
    # the control every configuration is compared with (cifarx report): axis -> value
    baseline: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # the file's text, logged with the sweep

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "source"}


@dataclass(frozen=True)
class Configuration:
    """One point of the study: the swept values as written, and the training config (seed 0)."""

    key: str
    axes: Mapping[str, Any]
    config: TrainConfig


def load(path: str | Path) -> Study:
    """Read a study file; a file that is not TOML, or holds an unknown key, is a UserError."""
    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except OSError as exc:
        raise UserError(f"study file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"study file {path}: not valid TOML ({exc})") from None
    return from_dict(raw, str(path), text)


def from_dict(raw: Mapping[str, Any], where: str = "study", source: str = "") -> Study:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; accepted: "
                        f"{', '.join(sorted(TOP_KEYS))}")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, bool) or not (isinstance(seeds, int) and seeds >= 1 or
                                       isinstance(seeds, list) and seeds and
                                       all(isinstance(s, int) and not isinstance(s, bool)
                                           for s in seeds)):
        raise UserError(f"{where}: seeds = {seeds!r}; accepted: a count >= 1 or a list of "
                        "whole numbers")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise UserError(f"{where}: search = {search!r}; accepted: {', '.join(SEARCHES)}")
    executor = raw.get("executor", {})
    if isinstance(executor, str):
        executor = {"name": executor}
    study = Study(
        experiment=str(raw.get("experiment", Study.experiment)),
        seeds=tuple(range(seeds)) if isinstance(seeds, int) else tuple(dict.fromkeys(seeds)),
        search=search, trials=raw.get("trials"), search_seed=raw.get("search-seed", 0),
        metric=raw.get("metric", Study.metric), direction=raw.get("direction", "maximize"),
        pruner=raw.get("pruner"), pruner_startup=raw.get("pruner-startup", PRUNER_STARTUP),
        pruner_warmup=raw.get("pruner-warmup"),
        train=flatten(raw.get("train", {}), where, "train"),
        grid=flatten(raw.get("grid", {}), where, "grid"),
        random=flatten(raw.get("random", {}), where, "random", leaves_are_tables=True),
        configurations=tuple(flatten(point, where, "[configurations]")
                             for point in _tables(raw.get("configurations", []), where)),
        executor=dict(executor), baseline=flatten(raw.get("baseline", {}), where, "baseline"),
        source=source)
    check(study, where)
    return study


def _tables(value, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise UserError(f"{where}: configurations must be [[configurations]] tables")
    return value


def flatten(table: Mapping[str, Any], where: str, section: str,
            leaves_are_tables: bool = False) -> dict[str, Any]:
    """TOML's nested tables of the option keys (``arch-opt.activation``) as flat keys."""
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: [{section}] must be a table of option = value")
    flat = {}
    for key, value in table.items():
        if key in OPTION_KEYS:
            depth = 2 if key in MULTI else 1
            shape = "PLUGIN.NAME" if key in MULTI else "NAME"
            for path, leaf in _leaves(value, depth, f"{where}: [{section}] {key}: expected "
                                                    f"{shape} = value (e.g. arch-opt.activation"
                                                    " = \"silu\", aug-opt.crop.pad = 2)"):
                flat[".".join((key, *path))] = leaf
        else:
            flat[key] = value
    for key, value in flat.items():
        if leaves_are_tables:
            _check_distribution(value, f"{where}: [{section}] {key}")
        elif section == "grid" and (not isinstance(value, list) or not value):
            raise UserError(f"{where}: [grid] {key} = {value!r}; accepted: a non-empty list of "
                            "values to try")
    return flat


def _leaves(value, depth: int, problem: str):
    if depth == 0:
        yield (), value
        return
    if not isinstance(value, Mapping):
        raise UserError(problem)
    for key, inner in value.items():
        for path, leaf in _leaves(inner, depth - 1, problem):
            yield (key, *path), leaf


def _check_distribution(value, where: str):
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise UserError(f"{where}: expected one of {{uniform = [a, b]}}, {{log-uniform = [a, b]}}, "
                        "{int = [a, b]}, {choice = [...]}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
        raise UserError(f"{where}: {kind} takes [low, high]" if kind != "choice"
                        else f"{where}: choice takes a non-empty list")
    if kind == "log-uniform" and not (0 < args[0] < args[1]):
        raise UserError(f"{where}: log-uniform needs 0 < low < high, got {args}")


def check(study: Study, where: str):
    listed = {k for point in study.configurations for k in point}
    known = set(study.train) | set(study.grid) | set(study.random) | listed
    for key in known:
        field_name(key, where)
    both = set(study.train) & (set(study.grid) | set(study.random) | listed)
    if both:
        raise UserError(f"{where}: {sorted(both)[0]} is both fixed ([train]) and swept; keep one")
    if study.search == "grid" and study.random:
        raise UserError(f"{where}: [random] needs search = \"random\" or \"tpe\"")
    if study.search in ("random", "tpe"):
        if not isinstance(study.trials, int) or isinstance(study.trials, bool) or study.trials < 1:
            raise UserError(f"{where}: search = \"{study.search}\" needs trials = N (N >= 1)")
        if not study.random and not study.grid:
            raise UserError(f"{where}: search = \"{study.search}\" needs a [random] table of "
                            "ranges")
    if study.search == "tpe" and study.configurations:
        raise UserError(f"{where}: search = \"tpe\" takes [random] and [grid], not "
                        "[[configurations]]")
    if study.search != "tpe" and (study.pruner is not None or study.pruner_warmup is not None
                                  or study.pruner_startup != PRUNER_STARTUP):
        raise UserError(f"{where}: pruner, pruner-startup and pruner-warmup need "
                        "search = \"tpe\"")
    if study.pruner is not None and study.pruner not in PRUNERS:
        raise UserError(f"{where}: pruner = {study.pruner!r}; accepted: {', '.join(PRUNERS)}")
    for key, value in (("pruner-startup", study.pruner_startup),
                       ("pruner-warmup", study.pruner_warmup)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise UserError(f"{where}: {key} = {value!r}; accepted: a whole number >= 0")
    axes = axes_of(study)
    for key, value in study.baseline.items():
        if key not in axes:
            raise UserError(f"{where}: baseline {key} = {value!r}: {key} is not swept; the "
                            f"axes are {', '.join(axes) or 'none'}")
        if key in study.grid and value not in study.grid[key]:
            raise UserError(f"{where}: baseline {key} = {value!r} is not one of the grid's "
                            f"values {study.grid[key]!r}")
    if study.direction not in ("maximize", "minimize"):
        raise UserError(f"{where}: direction = {study.direction!r}; accepted: maximize, minimize")


_HINTS = typing.get_type_hints(TrainConfig)


def field_name(key: str, where: str) -> str:
    """The TrainConfig field a study key sets (``eval-every`` -> ``eval_every``)."""
    head = key.split(".")[0]
    if head in OPTION_KEYS:
        parts = key.split(".")
        if len(parts) != (3 if head in MULTI else 2):
            raise UserError(f"{where}: {key}: expected {head}.{'PLUGIN.' if head in MULTI else ''}"
                            "NAME")
        return OPTION_KEYS[head]
    name = FIELD_OF.get(key, key.replace("-", "_"))
    if name not in _HINTS or name in OPTION_KEYS.values() or key in NOT_IN_STUDY:
        accepted = sorted(k.replace("_", "-") for k in _HINTS if k not in OPTION_KEYS.values()
                          and k not in NOT_IN_STUDY and k != "probes") + ["probe"] + \
            [f"{k}.NAME" for k in OPTION_KEYS]
        extra = " (seeds are given by `seeds`)" if key in NOT_IN_STUDY else ""
        raise UserError(f"{where}: unknown option {key!r}{extra}; accepted: the options of "
                        f"`cifarx train`: {', '.join(accepted)}")
    return name


def coerce(key: str, value: Any, where: str) -> Any:
    """A study value as the TrainConfig field takes it (``"8/255"`` -> 0.0314, ...)."""
    name = field_name(key, where)
    hint = str(_HINTS[name])
    if name in OPTION_KEYS.values():
        return value  # joined into NAME=VALUE by apply(); the plugin's schema checks it
    problem = UserError(f"{where}: {key} = {value!r}: not accepted; expected "
                        f"{'a whole number' if 'int' in hint else 'a number' if 'float' in hint else 'text'}")
    if "tuple" in hint:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        raise problem
    if isinstance(value, bool):
        raise problem
    if "int" in hint and "float" not in hint:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)  # from the command line
        if isinstance(value, int):
            return value
        raise problem
    if "float" in hint:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return opts.parse_number(value)
            except ValueError:
                raise problem from None
        raise problem
    if isinstance(value, (str, int, float)):
        return str(value)
    raise problem


def apply(settings: Mapping[str, Any], where: str, base: TrainConfig = TrainConfig()
          ) -> TrainConfig:
    """A TrainConfig with these study settings (fixed and swept) applied."""
    changes: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    for key, value in settings.items():
        name = field_name(key, where)
        if name in OPTION_KEYS.values():
            texts.setdefault(name, []).append(f"{key.split('.', 1)[1]}={opts.show(value)}")
        else:
            changes[name] = coerce(key, value, where)
    for name, items in texts.items():
        changes[name] = tuple(items)
    return replace(base, **changes)


def pruner_warmup(study: Study) -> int:
    """Iterations before a trial may be pruned: ``pruner-warmup``, else a quarter of the
    study's fixed ``iters`` (or of the default)."""
    if study.pruner_warmup is not None:
        return study.pruner_warmup
    iters = study.train.get("iters", TrainConfig.iters)
    try:
        return max(0, int(iters) // 4)
    except (TypeError, ValueError):
        return 0


def is_list(key: str) -> bool:
    """Whether a study key takes a comma list itself (``aug``, ``probe``, ``adv-data``)."""
    name = field_name(key, "study")
    return "tuple" in str(_HINTS[name]) and name not in OPTION_KEYS.values()


def raw_of(study: Study) -> dict[str, Any]:
    """A study back in its file's shape (:func:`from_dict` reads it)."""
    raw = {"experiment": study.experiment, "seeds": list(study.seeds), "search": study.search,
           "search-seed": study.search_seed, "metric": study.metric,
           "direction": study.direction, "train": dict(study.train), "grid": dict(study.grid),
           "random": dict(study.random), "executor": dict(study.executor),
           "configurations": [dict(p) for p in study.configurations]}
    if study.baseline:
        raw["baseline"] = dict(study.baseline)
    if study.trials is not None:
        raw["trials"] = study.trials
    if study.pruner is not None:
        raw["pruner"] = study.pruner
    if study.pruner_startup != PRUNER_STARTUP:
        raw["pruner-startup"] = study.pruner_startup
    if study.pruner_warmup is not None:
        raw["pruner-warmup"] = study.pruner_warmup
    return raw


def axes_of(study: Study) -> list[str]:
    """The swept keys, in the study's order."""
    listed = [k for point in study.configurations for k in point]
    return list(dict.fromkeys([*listed, *study.grid, *study.random]))
