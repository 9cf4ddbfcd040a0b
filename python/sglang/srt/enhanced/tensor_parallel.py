"""Check, before any weight is loaded, that a tensor-parallel size divides the model.

SGLang 0.4.7 splits, per tensor-parallel rank:

- attention query heads: ``num_attention_heads`` must be a multiple of the TP size;
- key/value heads: a multiple of the TP size, or (fewer heads than ranks) a divisor of
  it, each head then replicated on ``tp_size / num_key_value_heads`` ranks; not for MLA
  models (DeepSeek-V2/V3), whose compressed KV is not split by heads;
- MLP and expert projections: the intermediate size, which is the output dimension of
  the column-parallel ``gate``/``up`` (``w1``/``w3``) projections and the input dimension
  of the row-parallel ``down`` (``w2``) projection;
- GPTQ weights kept packed: each rank's share of a row-parallel input must hold whole
  quantization groups (a group never straddles two ranks).

The embeddings and ``lm_head`` are padded by SGLang and need no check. A size that does
not fit is refused with an ``EnhancedError`` naming the module and the sizes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError

__all__ = ["check_tensor_parallel", "row_parallel_input", "sharded_intermediate"]

# Projection names SGLang shards along the intermediate size (column: output dim 0, row: input dim 1).
_COLUMN = re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|w1|w3)\.weight$")
_ROW = re.compile(r"(^|\.)(down_proj|w2)\.weight$")
_ATTENTION_OUT = re.compile(r"(^|\.)o_proj\.weight$")


def sharded_intermediate(name: str, shape: tuple[int, ...]) -> int | None:
    """The intermediate size of an MLP/expert projection weight (None for other weights)."""
    if len(shape) != 2:
        return None
    if _COLUMN.search(name):
        return shape[0]
    if _ROW.search(name):
        return shape[1]
    return None


def row_parallel_input(name: str, shape: tuple[int, ...]) -> int | None:
    """The input size a row-parallel projection (``o_proj``, ``down_proj``, ``w2``) splits over the ranks."""
    if len(shape) == 2 and (_ROW.search(name) or _ATTENTION_OUT.search(name)):
        return shape[1]
    return None


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _first_attention_module(weight_shapes: Mapping[str, tuple[int, ...]]) -> str:
    for name in weight_shapes:
        if ".self_attn." in name:
            return name.split(".self_attn.", 1)[0] + ".self_attn"
    return "self_attn"


def _check_heads(config: Mapping[str, Any], tp_size: int, module: str) -> None:
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int):
        return
    if heads % tp_size:
        raise EnhancedError(
            f"--tp-size {tp_size} does not divide the attention heads of {module}: "
            f"num_attention_heads {heads} is not a multiple of {tp_size}",
            culprit=module,
        )
    if config.get("kv_lora_rank"):  # MLA: one compressed KV, not split by heads
        return
    kv_heads = config.get("num_key_value_heads") or heads
    fits = kv_heads % tp_size == 0 if kv_heads >= tp_size else tp_size % kv_heads == 0
    if not fits:
        raise EnhancedError(
            f"--tp-size {tp_size} does not fit the key/value heads of {module}: num_key_value_heads "
            f"{kv_heads} must be a multiple of {tp_size} or divide it",
            culprit=module,
        )


def check_tensor_parallel(
    tp_size: int,
    config: Mapping[str, Any],
    weight_shapes: Mapping[str, tuple[int, ...]],
    packed_groups: Mapping[str, int] | None = None,
) -> None:
    """Raise ``EnhancedError`` when ``tp_size`` does not divide the model.

    ``config`` is the model's ``config.json``; ``weight_shapes`` maps the model's weight
    names to their (unquantized) shapes; ``packed_groups`` maps the GPTQ weights served
    packed to their group size (``-1``: one group per column, no constraint).
    """
    if tp_size < 1:
        raise EnhancedError(f"--tp-size must be at least 1, got {tp_size}", culprit="--tp-size")
    if tp_size == 1:
        return
    _check_heads(config, tp_size, _first_attention_module(weight_shapes))
    for name, shape in weight_shapes.items():
        size = sharded_intermediate(name, tuple(shape))
        if size is not None and size % tp_size:
            raise EnhancedError(
                f"--tp-size {tp_size} does not divide the intermediate size of {_module(name)}: "
                f"{size} (weight shape {list(shape)}) is not a multiple of {tp_size}",
                culprit=_module(name),
            )
    for name, group_size in (packed_groups or {}).items():
        if group_size <= 0 or name not in weight_shapes:
            continue
        size = row_parallel_input(name, tuple(weight_shapes[name]))
        if size is None:
            continue
        share = size // tp_size
        if share % group_size:
            raise EnhancedError(
                f"--tp-size {tp_size} splits the GPTQ groups of {_module(name)}: its input of {size} "
                f"gives each rank {share} rows, not a multiple of group_size {group_size}",
                culprit=_module(name),
            )
