"""Plugin options: one schema, one parser and one resolver for every plugin kind.

A plugin declares each option once, with its default, type, accepted values or range and a
help line::

    options={"pad": Option(4, int, range="[0, 16]", help="zero padding on each side"),
             "eps": Option(8 / 255, float, range="(0, 1]", help="L-inf radius"),
             "mode": Option("fast", choices=("fast", "exact"))}

The user sets them with one flag shape per kind (``--arch-opt NAME=VALUE``, ``--aug-opt
PLUGIN.NAME=VALUE``, ...); :func:`resolve` checks the values and fills the defaults, and the
plugin's function receives plain typed keyword arguments. A value only the plugin can judge (a
layer name, a file) is the plugin's to check: it raises :class:`OptionError` naming the option,
and the caller turns that into a message naming the flag the user typed.

This module imports neither torch nor mlflow: ``cifarx --help`` reads the declarations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import UserError

TYPES = (int, float, str, bool)
TYPE_NAMES = {int: "a whole number", float: "a number (or a fraction: 8/255)",
              str: "text", bool: "true or false"}
_INTERVAL = re.compile(r"\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(\+?inf|[-+0-9.e]+)\s*([\])])\s*")


class OptionError(UserError):
    """A plugin's verdict on one of its options: ``OptionError("layer", "no module 'x'")``.

    The caller adds the flag the user typed (:meth:`for_flag`), so the plugin never guesses
    which command line it is running under.
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


@dataclass(frozen=True)
class Option:
    """One option: its ``default`` (``None``: not set), ``type`` (int, float, str or bool;
    taken from the default when omitted), the accepted ``choices`` or numeric ``range`` in
    interval notation (``"(0, 1]"``, ``"[1, inf)"``), and a ``help`` line."""

    default: Any = None
    type: type | None = None
    choices: tuple = ()
    range: str | None = None
    help: str = ""

    def __post_init__(self):
        kind = self.type or (type(self.default) if self.default is not None else
                             type(self.choices[0]) if self.choices else str)
        if kind not in TYPES:
            raise TypeError(f"Option type must be one of int, float, str, bool; got {kind!r}")
        object.__setattr__(self, "type", kind)
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.range is not None:
            interval(self.range)  # a malformed range fails at registration, not at use

    def accepted(self) -> str:
        """What the option accepts, in words: for messages and ``cifarx describe``."""
        if self.choices:
            return ", ".join(show(c) for c in self.choices)
        return TYPE_NAMES[self.type] + (f" in {self.range}" if self.range else "")


def option_of(value: Any) -> Option:
    """A declaration as a plugin may write it: an :class:`Option`, a tuple of accepted values
    (the first is the default), or a plain default value."""
    if isinstance(value, Option):
        return value
    if isinstance(value, tuple):
        if not value:
            raise TypeError("an option's tuple of accepted values is empty")
        return Option(value[0], choices=value)
    return Option(value)


def schema(declared: Mapping[str, Any]) -> dict[str, Option]:
    """Every declaration of a plugin as an :class:`Option` (the plugin types call this)."""
    return {name: option_of(value) for name, value in declared.items()}


def interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` -> (0.0, 1.0, low open, high open)."""
    found = _INTERVAL.fullmatch(text)
    if not found:
        raise ValueError(f"range {text!r}: expected interval notation such as '(0, 1]' or "
                         "'[1, inf)'")
    left, low, high, right = found.groups()
    return float(low), float(high), left == "(", right == ")"


def show(value: Any) -> str:
    """A value as the user would type it; a float in full (``repr``), so that what is logged
    and saved in config.json reads back as the same number."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)


def brief(value: Any) -> str:
    """A value for people to read: ``8/255`` for a multiple of 1/255 (unless its decimal is as
    short: ``0.4``, not ``102/255``), else short."""
    if isinstance(value, float) and not value.is_integer() and len(f"{value:g}") > 4 and \
            abs(value * 255 - round(value * 255)) < 1e-9:
        return f"{round(value * 255)}/255"
    return f"{value:g}" if isinstance(value, float) else show(value)


def parse_number(text: str) -> float:
    """``"0.1"``, ``"1e-3"`` or a fraction ``"8/255"`` -> float; ValueError otherwise."""
    top, slash, bottom = text.partition("/")
    try:
        value = float(top) / float(bottom) if slash else float(text)
    except ZeroDivisionError:
        raise ValueError(text) from None
    if math.isnan(value):
        raise ValueError(text)
    return value


def convert(option: Option, value: Any) -> Any:
    """A value given as text (the command line) or typed (Python, a study file) -> the
    option's type, checked against its choices and range. ValueError says what is accepted."""
    kind = option.type
    problem = ValueError(f"accepted: {option.accepted()}")
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = text.lower() in ("true", "1", "yes")
            elif kind is int:
                value = int(text)
            else:
                value = parse_number(text)
        except ValueError:
            raise problem from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
            (kind is float and math.isnan(value)):
        raise problem
    if option.choices and value not in option.choices:
        raise problem
    if option.range is not None:
        low, high, low_open, high_open = interval(option.range)
        if value < low or value > high or (low_open and value == low) or \
                (high_open and value == high):
            raise problem
    return value


def split_assignment(text: str) -> tuple[str, str]:
    """``"name=value"`` -> ``("name", "value")``; ValueError when there is no ``=``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(text)
    return name.strip(), value.strip()


def parse_assignments(flag: str, texts: list[str] | tuple[str, ...], plugins: list[str] | None
                      ) -> dict[str | None, dict[str, str]]:
    """The values of one option flag, by plugin.

    ``plugins`` is None for a single-plugin kind (``--arch-opt NAME=VALUE``, keyed None), else
    the plugins the user chose (``--aug-opt PLUGIN.NAME=VALUE``): naming another is an error.
    """
    found: dict[str | None, dict[str, str]] = {None: {}} if plugins is None else \
        {p: {} for p in plugins}
    example = "NAME=VALUE" if plugins is None else "PLUGIN.NAME=VALUE"
    for text in texts:
        try:
            key, value = split_assignment(text)
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected {example} (`cifarx describe` lists a "
                            "plugin's options)") from None
        plugin = None
        if plugins is not None:
            plugin, dot, key = key.rpartition(".")
            if not dot or not plugin or not key:
                raise UserError(f"{flag} {text!r}: expected {example} (`cifarx describe` lists "
                                "a plugin's options)")
            if plugin not in found:
                raise UserError(f"{flag} {text}: {plugin!r} is not among the plugins the run "
                                f"uses ({', '.join(found) or 'none given'}); add it first")
        if found[plugin].get(key, value) != value:
            raise UserError(f"{flag} {text}: {key} is given twice ({found[plugin][key]!r} and "
                            f"{value!r}); give it once")
        found[plugin][key] = value
    return found


def flag_label(flag: str, plugin: str | None, name: str) -> str:
    """How the user sets an option: ``--arch-opt init``, ``--aug-opt crop.pad``."""
    return f"{flag} {plugin + '.' if plugin else ''}{name}"


def resolve(owner: str, declared: Mapping[str, Option], given: Mapping[str, Any],
            label: Callable[[str], str]) -> dict[str, Any]:
    """Check ``given`` against a plugin's options; return every option, defaults filled.

    ``label(name)`` names the flag that set an option, for the messages
    (``--aug-opt crop.pad``, or ``--eps`` for an attack's own flag).
    """
    for name, value in given.items():
        if name not in declared:
            accepted = ", ".join(declared) or "none"
            raise UserError(f"{label(name)}={show(value)}: {owner} has no option {name!r}; "
                            f"accepted: {accepted}")
    chosen = {}
    for name, option in declared.items():
        if name not in given:
            chosen[name] = option.default
            continue
        try:
            chosen[name] = convert(option, given[name])
        except ValueError:
            raise UserError(f"{label(name)}={show(given[name])}: not accepted by {owner}; "
                            f"accepted: {option.accepted()}") from None
    return chosen


def reword(error: OptionError, label: Callable[[str], str], values: Mapping[str, Any]) -> UserError:
    """A plugin's :class:`OptionError` as a message naming the flag the user typed."""
    value = values.get(error.option)
    shown = f"={show(value)}" if value not in (None, "") else ""
    return UserError(f"{label(error.option)}{shown}: {error.message}")


UNSET = "(not set)"  # an option left unset: the plugin's documented default behaviour


def params(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every resolved option as the MLflow param ``<prefix>.<name>``; one left unset (None or
    empty text) as ``(not set)``, so that a run lists every option it used."""
    return {f"{prefix}.{name}": UNSET if value is None or value == "" else show(value)
            for name, value in values.items()}


def describe(declared: Mapping[str, Option]) -> list[tuple[str, str, str, str]]:
    """(name, default, accepted, help) rows for ``cifarx describe``."""
    return [(name, brief(o.default) if o.default not in (None, "") else "(not set)",
             o.accepted(), o.help) for name, o in declared.items()]
