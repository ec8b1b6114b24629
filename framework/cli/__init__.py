"""The ``cifarx`` command: parse the options, call :mod:`cifarx.runs`, print.

Imports here stay light (no torch, mlflow or matplotlib at module level): ``cifarx --help``
and ``cifarx <command> --help`` answer in a fraction of a second. Each command imports what
it runs.
"""

from __future__ import annotations

from . import (  # noqa: F401  registers the commands, in --help's order
    train, evaluate, catalog, ui, attack, sweep, sync, report)
from .common import app


def main():
    app(prog_name="cifarx")


__all__ = ["app", "main"]
