"""The module paths cifarx had before its packages (issue 18), kept working.

``import cifarx.trials`` gives the module that is now ``cifarx.studies.trials``: the same module
object (so ``cifarx.trials.Trial is cifarx.studies.trials.Trial``). Plugins, scripts and
pickles (a model saved with ``torch.save`` names its classes' modules) written against the old
paths keep working. A finder at the end of ``sys.meta_path`` answers for these names only, and
imports nothing until one of them is imported. The code in this repository uses the new paths
(tests/test_layout.py checks it).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

MOVED = {  # old path -> where the module is now
    "cifarx.adversarial": "cifarx.inference.adversarial",
    "cifarx.analysis": "cifarx.inference.analysis",
    "cifarx.assignment_report": "cifarx.reports.assignment",
    "cifarx.cli_report": "cifarx.cli.report",
    "cifarx.compare": "cifarx.studies.compare",
    "cifarx.config": "cifarx.training.config",
    "cifarx.console": "cifarx.cli.console",
    "cifarx.data": "cifarx.training.data",
    "cifarx.evaluation": "cifarx.inference.report",
    "cifarx.hookspecs": "cifarx.plugin_api.hookspecs",
    "cifarx.loop": "cifarx.training.loop",
    "cifarx.model": "cifarx.training.model",
    "cifarx.optim": "cifarx.training.optim",
    "cifarx.options": "cifarx.plugin_api.options",
    "cifarx.plugin_types": "cifarx.plugin_api.types",
    "cifarx.registry": "cifarx.plugin_api.registry",
    "cifarx.report": "cifarx.reports.report",
    "cifarx.report_data": "cifarx.reports.data",
    "cifarx.reproduce": "cifarx.reports.reproduce",
    "cifarx.spool": "cifarx.tracking.spool",
    "cifarx.stats": "cifarx.studies.stats",
    "cifarx.store": "cifarx.tracking.store",
    "cifarx.sweep": "cifarx.studies.sweep",
    "cifarx.transfer": "cifarx.inference.transfer",
    "cifarx.trials": "cifarx.studies.trials",
    "cifarx.validation": "cifarx.training.validation",
    "cifarx.weights": "cifarx.tracking.weights",
}


class _Aliases:
    """Finder and loader: the old name's module is replaced by the new one in sys.modules (the
    import system returns what sys.modules holds once the loader is done)."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None  # a placeholder, replaced in exec_module

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


if not any(isinstance(finder, _Aliases) for finder in sys.meta_path):
    sys.meta_path.append(_Aliases())
