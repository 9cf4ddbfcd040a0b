"""Check, before any weight is loaded, that a tensor-parallel size divides the model.

SGLang 0.4.7 splits, per tensor-parallel rank:

- attention query heads: ``num_attention_heads`` must be a multiple of the TP size;
- key/value heads: a multiple of the TP size, or (fewer heads than ranks) a divisor of
  it, each head then replicated on ``tp_size / num_key_value_heads`` ranks; not for MLA
  models (DeepSeek-V2/V3), whose compressed KV is not split by heads;
- MLP and expert projections: the intermediate size, which is the output dimension of
  the column-parallel ``gate``/``up`` (``w1``/``w3``) projections and the input dimension
  of the row-parallel ``down`` (``w2``) projection;
- weights kept packed (GPTQ, block FP8): each rank's piece must hold whole packed units,
  as the packed tensors are cut with the float weight: whole ``32/bits``-value words on
  both dims, whole quantization groups along a row-parallel input (not with act-order,
  where every rank keeps every group), whole scale blocks for block FP8.

The embeddings and ``lm_head`` are padded by SGLang and need no check. A size that does
not fit is refused with an ``EnhancedError`` naming the module and the sizes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError

__all__ = ["PackedUnits", "check_tensor_parallel", "rank_piece", "sharded_intermediate"]

# Projection names SGLang shards along the intermediate size (column: output dim 0, row: input dim 1).
_COLUMN = re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|w1|w3)\.weight$")
_ROW = re.compile(r"(^|\.)(down_proj|w2)\.weight$")
_ATTENTION_OUT = re.compile(r"(^|\.)o_proj\.weight$")
_QUERY = re.compile(r"(^|\.)(q_proj|q_b_proj|kv_b_proj)\.weight$")
_KEY_VALUE = re.compile(r"(^|\.)(k_proj|v_proj)\.weight$")


@dataclass(frozen=True)
class PackedUnits:
    """The smallest pieces a packed weight can be cut into, per dim, and what each unit is."""

    output: int = 1
    input: int = 1
    output_unit: str = ""
    input_unit: str = ""


def sharded_intermediate(name: str, shape: tuple[int, ...]) -> int | None:
    """The intermediate size of an MLP/expert projection weight (None for other weights)."""
    if len(shape) != 2:
        return None
    if _COLUMN.search(name):
        return shape[0]
    if _ROW.search(name):
        return shape[1]
    return None


def rank_piece(name: str, shape: tuple[int, ...], tp_size: int, kv_heads: int | None) -> tuple[str, int] | None:
    """``("output"|"input", size)``: the dim SGLang cuts this weight along and each rank's piece.

    None for weights every rank holds whole (router gates, norms, MLA's compressed projections).
    """
    if len(shape) != 2:
        return None
    out_features, in_features = shape
    if _ROW.search(name) or _ATTENTION_OUT.search(name):
        return "input", in_features // tp_size
    if _COLUMN.search(name) or _QUERY.search(name):
        return "output", out_features // tp_size
    if _KEY_VALUE.search(name):
        return "output", out_features // min(tp_size, kv_heads or tp_size)
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
    packed: Mapping[str, PackedUnits] | None = None,
) -> None:
    """Raise ``EnhancedError`` when ``tp_size`` does not divide the model.

    ``config`` is the model's ``config.json``; ``weight_shapes`` maps the model's weight
    names to their (unquantized) shapes; ``packed`` maps the weights served packed to
    the units their packed tensors are cut in (nothing for weights decoded while loading).
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
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    for name, units in (packed or {}).items():
        if name not in weight_shapes:
            continue
        piece = rank_piece(name, tuple(weight_shapes[name]), tp_size, kv_heads)
        if piece is None:
            continue
        dim, size = piece
        unit, why = (units.output, units.output_unit) if dim == "output" else (units.input, units.input_unit)
        if unit > 1 and size % unit:
            raise EnhancedError(
                f"--tp-size {tp_size} cuts the packed weight {_module(name)} into {size} {dim} features "
                f"per rank, not a multiple of {why or 'its packed unit'} ({unit})",
                culprit=_module(name),
            )
