"""Load a plan into a ``torch.nn.Module`` whose state_dict names are the checkpoint's names.

This is the path for transformers 4.x models (``Qwen2MoeForCausalLM`` and friends), whose
parameters are named exactly like the tensors of an unquantized checkpoint (one module per
expert). Models that fuse experts into one parameter (transformers 5) do not match.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource
from sglang.srt.enhanced.mixed_precision.weights import LoadStats, iter_plan_weights

logger = logging.getLogger(__name__)

__all__ = ["load_plan_into_module"]


def load_plan_into_module(
    module: torch.nn.Module,
    plan: LoadPlan,
    sources: Mapping[Precision, CheckpointSource],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> LoadStats:
    """Copy every planned weight into the parameter or buffer of the same name.

    Weights are decoded on the module's device (CPU when its tensors are spread over
    several) in ``dtype`` (default: the module's most common float dtype), then copied
    into each tensor on its own device and dtype. Tied tensors (``lm_head.weight`` sharing
    ``model.embed_tokens.weight``) count as loaded when any of their names is.

    With ``strict``, a planned weight with no tensor of its name and a module tensor never
    loaded both raise ``EnhancedError``; a shape mismatch always does.
    """
    targets = module.state_dict(keep_vars=True)
    if dtype is None:
        dtype = _common_float_dtype(targets.values()) or plan.dtype
    devices = {t.device for t in targets.values()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    if device.type == "meta":
        raise EnhancedError(
            "module tensors are on the meta device; materialize them before loading",
            culprit=type(module).__name__,
        )

    if strict:
        missing = [e.name for e in plan.entries if e.name not in targets]
        if missing:
            raise EnhancedError(
                f"{len(missing)} planned weights have no parameter or buffer in {type(module).__name__}"
                + (f" (first: {missing[:5]})" if len(missing) > 1 else ""),
                culprit=missing[0],
            )

    stats = LoadStats()
    loaded: set[int] = set()
    skipped: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_plan_weights(
            plan, sources, dtype=dtype, device=device, stats=stats, progress=progress
        ):
            target = targets.get(name)
            if target is None:
                skipped.append(name)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                raise EnhancedError(
                    f"shape mismatch: checkpoint {tuple(tensor.shape)}, module {tuple(target.shape)}",
                    culprit=name,
                )
            target.copy_(tensor)
            loaded.add(id(target))
    if skipped:
        logger.warning(
            "%d weights have no parameter or buffer and were skipped (first: %s)", len(skipped), skipped[0]
        )

    never = [name for name, t in targets.items() if id(t) not in loaded]
    if never and strict:
        shown = never if len(never) <= 20 else [*never[:20], "..."]
        raise EnhancedError(f"{len(never)} parameters/buffers were not loaded: {shown}", culprit=never[0])
    if never:
        logger.warning("%d parameters/buffers were not loaded (first: %s)", len(never), never[0])
    logger.info("%s", stats.summary_line())
    return stats


def _common_float_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    counts: Counter[torch.dtype] = Counter()
    for t in tensors:
        if t.dtype.is_floating_point:
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else None
