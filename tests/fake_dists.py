"""Installed-looking distributions made in a test: a module plus its .dist-info on sys.path.

importlib.metadata finds them exactly as it finds a pip-installed package.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path


def make_dist(root: Path, name: str, module: str, source: str, version: str = "1.0") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[cifarx]\n{module} = {module}\n")


def activate(root: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    for module in [p.stem for p in root.glob("*.py")]:
        monkeypatch.delitem(sys.modules, module, raising=False)


ARCH_PLUGIN = '''
    from torch import nn
    from cifarx import Architecture, hookimpl

    @hookimpl
    def register_architectures(register):
        register(Architecture(name={name!r}, build=lambda **kw: nn.Flatten(),
                              summary="from {package}"))
'''
