"""Cut packed tensors into this rank's piece, the way SGLang shards the float weight.

Column-parallel modules take a range of output features, row-parallel ones a range of
input features. On packed tensors a cut must fall on whole packed words (GPTQ packs
``32/bits`` values per word, 3-bit 32 values per 3 words) and, along the input dim, on
whole quantization groups (GPTQ without act-order) or scale blocks (block FP8); a cut
that does not raises ``EnhancedError`` naming the module and the sizes. With act-order
every rank keeps all groups' scales and zeros (its rows may belong to any group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Scale
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.packing import block_shape

__all__ = ["GPTQ_ROLES", "Piece", "check_aligned", "shard_fp8_tensor", "shard_gptq_tensor"]

GPTQ_ROLES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Piece:
    """Features ``[start, start + size)`` of ``total``: one rank's piece of one dim."""

    start: int
    size: int
    total: int

    @classmethod
    def whole(cls, total: int) -> Piece:
        return cls(0, total, total)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.total

    @property
    def stop(self) -> int:
        return self.start + self.size


def check_aligned(module: str, what: str, piece: Piece, unit: int, why: str) -> None:
    """Refuse a cut of ``piece`` that does not start and end on a multiple of ``unit`` (or the end)."""
    if piece.is_whole or unit <= 1:
        return
    if piece.start % unit or (piece.stop % unit and piece.stop != piece.total):
        raise EnhancedError(
            f"tensor parallelism cuts {what} ({piece.total}) at [{piece.start}, {piece.stop}), "
            f"which splits {why} of {unit}; choose a TP size whose pieces are multiples of {unit}",
            culprit=module,
        )


def _groups_sliced(fmt: GPTQFormat, act_order: bool, inp: Piece) -> bool:
    return not inp.is_whole and not act_order and fmt.group_size != -1


def shard_gptq_tensor(
    module: str, role: str, tensor: torch.Tensor, fmt: GPTQFormat, *, out: Piece, inp: Piece, act_order: bool
) -> torch.Tensor:
    """This rank's piece of one stored GPTQ tensor (``role`` one of :data:`GPTQ_ROLES`, 2-D or ``g_idx`` 1-D)."""
    values, words = block_shape(fmt.bits)
    check_aligned(module, "output features", out, values, f"a {fmt.bits}-bit packed word block")
    check_aligned(module, "input features", inp, values, f"a {fmt.bits}-bit packed word block")
    grouped = _groups_sliced(fmt, act_order, inp)
    if grouped:
        check_aligned(module, "input features", inp, fmt.group_size, "a quantization group")
    first_group, last_group = (inp.start // fmt.group_size, math.ceil(inp.stop / fmt.group_size)) if grouped else (0, 0)
    if role == "g_idx":
        piece = tensor[inp.start : inp.stop]
        return piece - first_group if grouped else piece
    if role in ("qweight", "scales") and not out.is_whole:
        tensor = tensor[:, out.start : out.stop]
    if role == "qzeros" and not out.is_whole:
        tensor = tensor[:, out.start // values * words : math.ceil(out.stop / values) * words]
    if role == "qweight" and not inp.is_whole:
        tensor = tensor[inp.start // values * words : math.ceil(inp.stop / values) * words]
    if role in ("qzeros", "scales") and grouped:
        tensor = tensor[first_group:last_group]
    return tensor


def shard_fp8_tensor(
    module: str,
    role: str,
    tensor: torch.Tensor,
    kind: FP8Scale,
    block: tuple[int, int] | None,
    *,
    out: Piece,
    inp: Piece,
) -> torch.Tensor:
    """This rank's piece of an FP8 ``weight`` ``[out, in]`` or its ``scale``."""
    if role == "weight":
        return tensor[out.start : out.stop, inp.start : inp.stop]
    if kind == FP8Scale.BLOCK:
        assert block is not None
        bo, bi = block
        check_aligned(module, "output features", out, bo, "a scale block")
        check_aligned(module, "input features", inp, bi, "a scale block")
        return tensor[out.start // bo : math.ceil(out.stop / bo), inp.start // bi : math.ceil(inp.stop / bi)]
    if kind == FP8Scale.CHANNEL:
        return tensor.reshape(-1)[out.start : out.stop]
    return tensor.reshape(-1)[:1].expand(out.size)  # per-tensor: one scale for every output feature
