"""Unquantized checkpoints: every stored tensor is its own logical weight."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.registry import register_decoder

_T = TypeVar("_T")


def cast_stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored float tensor in ``dtype``; returned unchanged when it already is (bit-identical).

    Integer and bool tensors (index buffers) are returned as stored.
    """
    if tensor.dtype == dtype or not tensor.dtype.is_floating_point:
        return tensor
    return tensor.to(dtype)


def stored_part(logical_name: str, parts: Mapping[str, _T]) -> _T:
    """The part stored under the weight's own name (tensor or shape); an error naming it if absent."""
    part = parts.get(logical_name)
    if part is None:
        raise EnhancedError(f"stored tensor missing; parts given: {sorted(parts)}", culprit=logical_name)
    return part


def stored_nbytes(logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes in ``dtype`` of a weight stored unquantized under its own name."""
    return nbytes_as(tuple(stored_part(logical_name, part_shapes)), None, dtype)


def nbytes_as(shape: tuple[int, ...], stored_dtype: torch.dtype | None, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` after :func:`cast_stored` to ``dtype``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if stored_dtype is not None and not stored_dtype.is_floating_point:
        return numel * stored_dtype.itemsize
    return numel * dtype.itemsize


@register_decoder("plain")
class PlainDecoder:
    """Identity mapping; ``decode`` casts float tensors to the requested dtype."""

    format_name = "plain"

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> PlainDecoder:
        return cls()

    def logical_names(self, stored_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        return {name: (name,) for name in stored_names}

    def decode(
        self, logical_name: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        return cast_stored(logical_name, stored_part(logical_name, parts), dtype)

    def decoded_nbytes(
        self, logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype
    ) -> int:
        return stored_nbytes(logical_name, part_shapes, dtype)
