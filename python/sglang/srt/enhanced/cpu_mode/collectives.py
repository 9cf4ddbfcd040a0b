"""SGLang 0.4.7's tensor-parallel collectives on the CPU, through ``torch.distributed`` (gloo).

On the CPU, SGLang's ``GroupCoordinator`` sends an all-reduce to
``intel_extension_for_pytorch`` and an all-gather through a custom op that is
registered for CUDA only, so ``--tp-size 2`` cannot run on a stock CPU install.
In CPU mode, where ipex is not installed, both are replaced for CPU tensors by the
``torch.distributed`` collective on the group's device group, which SGLang's model
runner creates with the gloo backend for ``--device cpu``. Broadcast already calls
``torch.distributed`` directly and is left as it is. GPU tensors, and machines with
ipex, keep SGLang's own paths.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_ORIGINAL = "__sglang_enhanced_original__"


def has_real_cpu_collectives() -> bool:
    """True where ``intel_extension_for_pytorch`` is installed (SGLang's own CPU all-reduce works)."""
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


def gloo_group(coordinator: Any) -> dist.ProcessGroup:
    """The coordinator's device group where it is gloo, else its CPU group (always gloo).

    The device group comes first: SGLang's scheduler broadcasts requests over the CPU
    group from another thread while the overlapped forward pass runs its collectives.
    """
    group = coordinator.device_group
    if dist.get_backend(group) == "gloo":
        return group
    return coordinator.cpu_group


def _all_reduce(self: Any, input_: torch.Tensor) -> torch.Tensor:
    if self.world_size == 1 or not input_.is_cpu:
        return getattr(_all_reduce, _ORIGINAL)(self, input_)
    dist.all_reduce(input_, group=gloo_group(self))
    return input_


def _all_gather_into_tensor(self: Any, output: torch.Tensor, input: torch.Tensor) -> None:  # noqa: A002
    if not input.is_cpu:
        return getattr(_all_gather_into_tensor, _ORIGINAL)(self, output, input)
    # torch 2.13 renames all_gather_into_tensor to all_gather_single (same arguments).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=gloo_group(self))
    return None


_REPLACEMENTS = {"all_reduce": _all_reduce, "all_gather_into_tensor": _all_gather_into_tensor}


def route_collectives_to_gloo() -> bool:
    """Replace the CPU all-reduce / all-gather of ``GroupCoordinator``; False (nothing done) where ipex exists."""
    if has_real_cpu_collectives():
        return False
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    for name, replacement in _REPLACEMENTS.items():
        current = getattr(GroupCoordinator, name)
        if current is replacement:
            continue
        setattr(replacement, _ORIGINAL, current)
        setattr(GroupCoordinator, name, replacement)
    logger.debug("CPU mode: tensor-parallel all-reduce / all-gather routed to torch.distributed (gloo)")
    return True


def restore_collectives() -> None:
    """Put SGLang's own methods back (for tests)."""
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    for name, replacement in _REPLACEMENTS.items():
        if getattr(GroupCoordinator, name) is replacement:
            setattr(GroupCoordinator, name, getattr(replacement, _ORIGINAL))
