"""Names SGLang 0.4.7 imports from Triton <= 3.3 that newer Triton moved.

``sglang.srt.utils`` imports ``default_cache_dir`` / ``default_dump_dir`` /
``default_override_dir`` from ``triton.runtime.cache``; Triton 3.4+ keeps those folders in
``triton.knobs.cache``. Once the real ``triton.runtime.cache`` has run, the missing names
are added, answering from the knobs (which honour ``TRITON_CACHE_DIR`` and friends). A
Triton that still has them is left untouched.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType

MODULE = "triton.runtime.cache"
_KNOBS = {"default_cache_dir": "dir", "default_dump_dir": "dump_dir", "default_override_dir": "override_dir"}


def add_missing_names(module: ModuleType) -> None:
    """Give ``triton.runtime.cache`` the three folder functions where it lacks them."""
    for name, knob in _KNOBS.items():
        if hasattr(module, name):
            continue

        def folder(knob: str = knob) -> str:
            from triton import knobs

            return getattr(knobs.cache, knob)

        folder.__name__ = name
        setattr(module, name, folder)


class _AfterExec(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec):  # noqa: ANN001
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        add_missing_names(module)


class TritonCacheFinder(importlib.abc.MetaPathFinder):
    """Asked first for ``triton.runtime.cache`` only: the real module, completed after it runs."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        if fullname != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); complete the module if already imported."""
    if MODULE in sys.modules:
        add_missing_names(sys.modules[MODULE])
    if not any(isinstance(f, TritonCacheFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TritonCacheFinder())
