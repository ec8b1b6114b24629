"""cifarx: a plugin-based experiment framework for small-image deep learning.

What a plugin author imports::

    from cifarx import (hookimpl, Architecture, Augmentation, Dataset, Probe, Attack,
                        AttackResult, Executor, Family, Option, OptionError)

It imports no torch, mlflow or matplotlib: ``cifarx --help`` starts in a fraction of a second.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .errors import UserError
from .hookspecs import hookimpl
from .options import Option, OptionError
from .plugin_types import (Architecture, Attack, AttackResult, Augmentation, Dataset, Executor,
                           Family, ImageData, Probe)

try:
    __version__ = _version("cifarx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "Architecture", "Attack", "AttackResult", "Augmentation", "Dataset",
           "Executor", "Family", "ImageData", "Option", "OptionError", "Probe", "UserError", "__version__"]
