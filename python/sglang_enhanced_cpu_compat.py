"""CPU mode for stock SGLang 0.4.7: the import names it expects where there is no GPU.

On a machine without CUDA, SGLang 0.4.7 imports ``vllm`` and ``sgl_kernel`` at
import time (for names it never calls on the CPU path). This module installs a
meta-path finder, *after* all real finders, that answers those imports with small
stand-ins from ``sglang.srt.enhanced.cpu_mode.shims`` — but only when

* no real ``vllm`` / ``sgl_kernel`` is installed (a real package is always found
  first and is never shadowed),
* CUDA is not available, and
* ``SGLANG_ENHANCED_CPU_COMPAT`` is not ``0``.

Under the same conditions, once SGLang's fused-MoE layer module is imported, its
unquantized MoE is routed to SGLang's torch-native path
(``sglang.srt.enhanced.cpu_mode.moe``), so a stock ``sglang.launch_server --device
cpu`` serves MoE models too; and once its parallel-state module is imported, the
tensor-parallel all-reduce / all-gather of CPU tensors go through ``torch.distributed``
with gloo where ``intel_extension_for_pytorch`` is not installed
(``sglang.srt.enhanced.cpu_mode.collectives``), so ``--tp-size N`` runs on the CPU.

It is installed at interpreter start by ``sglang_enhanced_cpu_compat.pth`` and
uses only the standard library until one of those imports actually happens.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_PROVIDED = {
    "vllm": "vllm_root",
    "vllm._custom_ops": "vllm_custom_ops",
    "vllm.model_executor": "vllm_package",
    "vllm.model_executor.layers": "vllm_package",
    "vllm.model_executor.layers.activation": "vllm_activation",
    "vllm.model_executor.layers.layernorm": "vllm_layernorm",
    "sgl_kernel": "sgl_kernel_root",
}


def _enabled() -> bool:
    if os.environ.get("SGLANG_ENHANCED_CPU_COMPAT", "1") == "0":
        return False
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return not torch.cuda.is_available()


class _ShimLoader(importlib.abc.Loader):
    def __init__(self, builder: str) -> None:
        self.builder = builder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        shims = importlib.import_module("sglang.srt.enhanced.cpu_mode.shims")
        getattr(shims, self.builder)(module)


class CpuCompatFinder(importlib.abc.MetaPathFinder):
    """Supplies the stand-in modules SGLang imports on a CPU-only machine."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        builder = _PROVIDED.get(fullname)
        if builder is None or not _enabled():
            return None
        is_package = builder in ("vllm_root", "vllm_package", "sgl_kernel_root")
        spec = importlib.util.spec_from_loader(fullname, _ShimLoader(builder), is_package=is_package)
        if is_package and spec is not None:
            spec.submodule_search_locations = []
        return spec


# SGLang module -> (CPU-mode module, function) run right after the SGLang module is executed.
_AFTER_IMPORT = {
    "sglang.srt.layers.moe.fused_moe_triton.layer": (
        "sglang.srt.enhanced.cpu_mode.moe", "route_moe_to_native"),
    "sglang.srt.distributed.parallel_state": (
        "sglang.srt.enhanced.cpu_mode.collectives", "route_collectives_to_gloo"),
}


class _AfterExecLoader(importlib.abc.Loader):
    """Runs the real loader, then the CPU-mode hook of the module."""

    def __init__(self, real: importlib.abc.Loader, hook: tuple[str, str]) -> None:
        self.real = real
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.real.exec_module(module)
        hook_module, function = self.hook
        getattr(importlib.import_module(hook_module), function)()


class AfterImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the import of the SGLang modules CPU mode adjusts (fused MoE, parallel state)."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        hook = _AFTER_IMPORT.get(fullname)
        if hook is None or not _enabled():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterExecLoader(spec.loader, hook)
                return spec
        return None


def install() -> None:
    """Add the finders to ``sys.meta_path`` once: stand-ins last, the after-import wrapper first."""
    if not any(isinstance(f, CpuCompatFinder) for f in sys.meta_path):
        sys.meta_path.append(CpuCompatFinder())
    if not any(isinstance(f, AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImportFinder())
