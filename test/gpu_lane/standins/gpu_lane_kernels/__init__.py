"""Stand-ins for ``sgl_kernel`` and ``vllm._custom_ops`` on a CUDA machine that has neither.

SGLang 0.4.7 imports these compiled packages on CUDA. The GPU test lane runs the stock
server on a machine where they are absent; :func:`install` adds a meta-path finder, after
every real finder, that answers ``import sgl_kernel`` / ``import vllm._custom_ops`` with
modules built from :mod:`gpu_lane_kernels.ops` -- only when

* no real package of that name is installed (the finder is asked last, so a real one wins),
* CUDA is available (on CPU the product's own CPU mode answers these names), and
* ``SGLANG_GPU_LANE_STANDINS`` is not ``0``.

Names SGLang imports but the lane's path never calls resolve to objects that raise,
naming the op, when called.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType

STAND_IN_MARK = "__gpu_lane_stand_in__"

SGL_KERNEL_OPS = (
    "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm",
    "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul",
    "apply_rope_with_cos_sin_cache_inplace",
    "topk_softmax", "moe_align_block_size",
    "top_k_renorm_prob", "top_p_renorm_prob", "min_p_sampling_from_probs", "top_k_top_p_sampling_from_probs",
)
VLLM_CUSTOM_OPS = ("rotary_embedding", "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul")


class MissingOp:
    """A name SGLang imports but the lane never calls: raises on call, naming the op."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{self._name} has no stand-in in the GPU test lane")

    def __getattr__(self, attr: str) -> MissingOp:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return MissingOp(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<missing op {self._name}>"


def _fill(module: ModuleType, names: tuple[str, ...]) -> None:
    from gpu_lane_kernels import ops

    setattr(module, STAND_IN_MARK, True)
    for name in names:
        setattr(module, name, getattr(ops, name))
    prefix = module.__name__

    def __getattr__(attr: str):  # noqa: N807 - module attribute hook
        if attr.startswith("__"):
            raise AttributeError(attr)
        return MissingOp(f"{prefix}.{attr}")

    module.__getattr__ = __getattr__


_BUILDERS = {
    "sgl_kernel": lambda m: _fill(m, SGL_KERNEL_OPS),
    "vllm": lambda m: setattr(m, STAND_IN_MARK, True),
    "vllm._custom_ops": lambda m: _fill(m, VLLM_CUSTOM_OPS),
}
_PACKAGES = {"sgl_kernel", "vllm"}


def enabled() -> bool:
    """Stand-ins apply: switched on, and CUDA is available (checked once torch is imported)."""
    if os.environ.get("SGLANG_GPU_LANE_STANDINS", "1") == "0":
        return False
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):  # noqa: ANN001
        return None

    def exec_module(self, module: ModuleType) -> None:
        _BUILDERS[module.__name__](module)


class StandInFinder(importlib.abc.MetaPathFinder):
    """Asked after every real finder: supplies the stand-in modules."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001
        if fullname not in _BUILDERS or not enabled():
            return None
        spec = importlib.util.spec_from_loader(fullname, _Loader(), is_package=fullname in _PACKAGES)
        if spec is not None and fullname in _PACKAGES:
            spec.submodule_search_locations = []
        return spec


def install() -> None:
    """Append the finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(StandInFinder())


def is_stand_in(module: ModuleType) -> bool:
    """True for a module built here rather than an installed package."""
    return bool(getattr(module, STAND_IN_MARK, False))
