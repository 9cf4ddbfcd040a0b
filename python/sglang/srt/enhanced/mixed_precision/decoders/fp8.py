"""FP8 checkpoints decoded to floats: block-wise (``weight_scale_inv``) and per-tensor / per-channel (``weight_scale``).

The format and its shape check live in :mod:`...formats.fp8`. ``input_scale`` and
``weight_scale*`` are scale tensors, not weights; everything else (norms, embeddings,
router gates) passes through as in a plain checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.plain import (
    cast_stored,
    stored_nbytes,
    stored_part,
)
from sglang.srt.enhanced.mixed_precision.decoders.registry import register_decoder
from sglang.srt.enhanced.mixed_precision.dequant import dequant_fp8_block, dequant_fp8_scaled
from sglang.srt.enhanced.mixed_precision.formats.fp8 import (
    FP8_DTYPES,
    SCALE_SUFFIXES,
    FP8Format,
    FP8Scale,
    check_fp8_tensors,
)

logger = logging.getLogger(__name__)

__all__ = ["FP8_DTYPES", "FP8Decoder"]


@register_decoder("fp8", "compressed-tensors")
class FP8Decoder:
    """Dequantizes FP8 weights with their scales; unscaled tensors pass through."""

    format_name = "fp8"

    def __init__(self, weight_block_size: tuple[int, int] | None = None) -> None:
        self.format = FP8Format(tuple(weight_block_size) if weight_block_size is not None else None)

    @property
    def weight_block_size(self) -> tuple[int, int] | None:
        return self.format.weight_block_size

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> FP8Decoder:
        return cls(FP8Format.from_checkpoint(folder, quantization_config).weight_block_size)

    # -- names ---------------------------------------------------------------------------
    def logical_names(self, stored_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        stored = set(stored_names)
        mapping: dict[str, tuple[str, ...]] = {}
        for name in sorted(stored):
            if name.rsplit(".", 1)[-1] in SCALE_SUFFIXES:
                continue
            parts = [name]
            if name.endswith(".weight"):
                prefix = name[: -len(".weight")]
                for suffix in ("weight_scale_inv", "weight_scale"):
                    if f"{prefix}.{suffix}" in stored:
                        parts.append(f"{prefix}.{suffix}")
                        break
            mapping[name] = tuple(parts)
        for name in stored:
            prefix, _, suffix = name.rpartition(".")
            if suffix in ("weight_scale_inv", "weight_scale") and f"{prefix}.weight" not in stored:
                raise EnhancedError("scale stored without its weight", culprit=name)
        return mapping

    # -- decoding ------------------------------------------------------------------------
    @staticmethod
    def _scale(logical_name: str, parts: Mapping[str, Any]) -> tuple[Any, bool]:
        """The stored scale of a weight (or None) and whether it is an inverse (block) scale."""
        if not logical_name.endswith(".weight"):
            return None, False
        prefix = logical_name[: -len(".weight")]
        scale_inv = parts.get(f"{prefix}.weight_scale_inv")
        if scale_inv is not None:
            return scale_inv, True
        return parts.get(f"{prefix}.weight_scale"), False

    def decode(
        self, logical_name: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        weight = stored_part(logical_name, parts)
        scale, inverse = self._scale(logical_name, parts)
        if scale is None:
            return cast_stored(logical_name, weight, dtype)
        kind = check_fp8_tensors(logical_name, weight, scale, scale_is_inverse=inverse, fmt=self.format)
        if kind == FP8Scale.BLOCK:
            return dequant_fp8_block(weight, scale, self.format.weight_block_size, dtype)  # type: ignore[arg-type]
        return dequant_fp8_scaled(weight, scale, dtype)

    def decoded_nbytes(
        self, logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype
    ) -> int:
        scale_shape, inverse = self._scale(logical_name, part_shapes)
        if scale_shape is not None:
            # The same check as at decode time, from the shapes alone: a bad scale is
            # refused when the plan is built. Stored dtypes are checked at decode.
            check_fp8_tensors(
                logical_name,
                torch.empty(tuple(stored_part(logical_name, part_shapes)), dtype=torch.float8_e4m3fn, device="meta"),
                torch.empty(tuple(scale_shape), dtype=torch.float32, device="meta"),
                scale_is_inverse=inverse,
                fmt=self.format,
            )
        return stored_nbytes(logical_name, part_shapes, dtype)
