"""Fixes applied right after a module is imported, for SGLang 0.4.7 on the lane's machine.

* ``triton.runtime.cache``: ``sglang.srt.utils`` imports ``default_cache_dir`` /
  ``default_dump_dir`` / ``default_override_dir``, which Triton 3.4+ keeps in
  ``triton.knobs.cache``; the missing names are added, answering from the knobs (which
  honour ``TRITON_CACHE_DIR`` and friends). A Triton that has them is left untouched.
* ``sglang.srt.utils``: on CUDA the server start asserts that the ``sgl-kernel``
  distribution is installed (``assert_pkg_version("sgl-kernel", "0.1.7", ...)``). Where
  ``sgl_kernel`` resolves to the lane's stand-in that check is skipped, with a warning;
  every other check, and this one wherever a real sgl-kernel is installed, runs unchanged.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)
_KNOBS = {"default_cache_dir": "dir", "default_dump_dir": "dump_dir", "default_override_dir": "override_dir"}


def add_triton_cache_names(module: ModuleType) -> None:
    """Give ``triton.runtime.cache`` the three folder functions where it lacks them."""
    for name, knob in _KNOBS.items():
        if hasattr(module, name):
            continue

        def folder(knob: str = knob) -> str:
            from triton import knobs

            return getattr(knobs.cache, knob)

        folder.__name__ = name
        setattr(module, name, folder)


def accept_stand_in_sgl_kernel(module: ModuleType) -> None:
    """Wrap ``assert_pkg_version`` so it passes for ``sgl-kernel`` served by the stand-in."""
    check = module.assert_pkg_version

    def assert_pkg_version(pkg: str, min_version: str, message: str) -> None:
        if pkg == "sgl-kernel":
            import gpu_lane_kernels

            if gpu_lane_kernels.is_stand_in(importlib.import_module("sgl_kernel")):
                logger.warning("sgl-kernel is not installed: the GPU lane's torch stand-ins serve its ops")
                return
        check(pkg, min_version, message)

    module.assert_pkg_version = assert_pkg_version


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "triton.runtime.cache": add_triton_cache_names,
    "sglang.srt.utils": accept_stand_in_sgl_kernel,
}


class _AfterExec(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.real, self.patch = real, patch

    def create_module(self, spec):  # noqa: ANN001
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        self.patch(module)


class PatchFinder(importlib.abc.MetaPathFinder):
    """Asked first for the patched modules only: the real module, then its fix."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterExec(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); fix modules already imported."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, PatchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PatchFinder())
