"""Stand-in modules for the ``vllm`` / ``sgl_kernel`` names SGLang 0.4.7 imports on CPU.

Each builder fills an empty module. Nothing here is ever a real kernel: the CPU
path of SGLang uses its own torch-native layers, and every stand-in function
raises if it is called, naming itself.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

from sglang.srt.enhanced.errors import EnhancedError

_MARK = "__sglang_enhanced_cpu_stand_in__"


def _unavailable(name: str):
    def stand_in(*args: object, **kwargs: object) -> None:
        raise EnhancedError("this GPU kernel is not available in SGLang's CPU mode", culprit=name)

    stand_in.__name__ = name.rsplit(".", 1)[-1]
    return stand_in


def _mark(module: ModuleType) -> None:
    setattr(module, _MARK, True)


def vllm_root(module: ModuleType) -> None:
    _mark(module)
    module.__version__ = "0.0.0+sglang-enhanced-cpu"


def vllm_package(module: ModuleType) -> None:
    _mark(module)


def vllm_custom_ops(module: ModuleType) -> None:
    """Every attribute is a stand-in that raises when called (SGLang imports many, calls none on CPU)."""
    _mark(module)

    def __getattr__(name: str):  # noqa: N807 - module-level attribute hook
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(f"vllm._custom_ops.{name}")

    module.__getattr__ = __getattr__


def vllm_activation(module: ModuleType) -> None:
    from sglang.srt.layers import activation

    _mark(module)
    module.SiluAndMul = activation.SiluAndMul
    module.GeluAndMul = activation.GeluAndMul


def vllm_layernorm(module: ModuleType) -> None:
    from sglang.srt.layers import layernorm

    _mark(module)
    module.RMSNorm = layernorm.RMSNorm
    module.GemmaRMSNorm = layernorm.GemmaRMSNorm


def sgl_kernel_root(module: ModuleType) -> None:
    _mark(module)
    names = ("init_custom_ar", "all_reduce_reg", "all_reduce_unreg", "dispose", "meta_size",
             "register_buffer", "get_graph_buffer_ipc_meta", "register_graph_buffers",
             "allocate_meta_buffer")
    module.allreduce = SimpleNamespace(**{n: _unavailable(f"sgl_kernel.allreduce.{n}") for n in names})


def is_stand_in(module: ModuleType) -> bool:
    """True for a module built here rather than a real installed package."""
    return bool(getattr(module, _MARK, False))
