"""cifarx: a plugin-based experiment framework for small-image deep learning.

What a plugin author imports::

    from cifarx import (hookimpl, Architecture, Augmentation, Dataset, Probe, Attack,
                        AttackResult, Executor, Analysis, AnalysisData, Findings, Family,
                        Option, OptionError)

It imports no torch, mlflow or matplotlib: ``cifarx --help`` starts in a fraction of a second.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from . import _moved  # noqa: F401  keeps the old module paths working
from .errors import UserError
from .plugin_api.hookspecs import hookimpl
from .plugin_api.options import Option, OptionError
from .plugin_api.types import (Analysis, AnalysisData, Architecture, Attack, AttackResult,
                               Augmentation, Dataset, Executor, Family, Findings, ImageData, Probe)
from .tracking.weights import rebuilding

try:
    __version__ = _version("cifarx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "Analysis", "AnalysisData", "Architecture", "Attack", "AttackResult",
           "Augmentation", "Dataset", "Executor", "Family", "Findings", "ImageData", "Option",
           "OptionError", "Probe", "UserError", "__version__", "rebuilding"]
