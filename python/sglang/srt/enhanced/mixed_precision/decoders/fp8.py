"""FP8 checkpoints: block-wise (``weight_scale_inv``) and per-tensor / per-channel (``weight_scale``).

- ``quant_method: "fp8"`` (DeepSeek / Qwen FP8 style): ``X.weight`` float8_e4m3fn ``[out, in]``
  and ``X.weight_scale_inv`` float32 ``[ceil(out/bo), ceil(in/bi)]`` with
  ``weight_block_size: [bo, bi]``; ``w = weight * scale_inv[o // bo, i // bi]``.
- ``quant_method: "compressed-tensors"`` with 8-bit float weights: ``X.weight`` and
  ``X.weight_scale`` (scalar/``[1]`` per tensor, ``[out]``/``[out, 1]`` per channel, or a
  block grid with ``block_structure``); ``w = weight * weight_scale``.

``input_scale`` and ``weight_scale*`` are scale tensors, not weights; everything else
(norms, embeddings, router gates) passes through as in a plain checkpoint.
"""

from __future__ import annotations

import logging
import math
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
from sglang.srt.enhanced.mixed_precision.decoders.registry import read_json, register_decoder
from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
)

logger = logging.getLogger(__name__)

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _block_size(value: Any, culprit: str) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise EnhancedError(f"block size must be two positive integers, got {value!r}", culprit=culprit)
    return int(value[0]), int(value[1])


def _compressed_tensors_block(qc: Mapping[str, Any], source: str) -> tuple[int, int] | None:
    """Check a compressed-tensors config has 8-bit float weights; return its block shape if any."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise EnhancedError(
            "compressed-tensors config without config_groups", culprit=f"{source}:config_groups"
        )
    block = None
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        key = f"{source}:config_groups.{gname}.weights"
        if not isinstance(weights, dict):
            raise EnhancedError("config group without weights", culprit=key)
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise EnhancedError(
                f"only 8-bit float weights are supported in compressed-tensors checkpoints, got "
                f"type {weights.get('type')!r} num_bits {weights.get('num_bits')!r}",
                culprit=key,
            )
        if weights.get("strategy") == "block":
            block = _block_size(weights.get("block_structure"), f"{key}.block_structure")
    return block


@register_decoder("fp8", "compressed-tensors")
class FP8Decoder:
    """Dequantizes FP8 weights with their scales; unscaled tensors pass through."""

    format_name = "fp8"

    def __init__(self, weight_block_size: tuple[int, int] | None = None) -> None:
        self.weight_block_size = tuple(weight_block_size) if weight_block_size is not None else None

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> FP8Decoder:
        source = f"{Path(folder) / 'config.json'}:quantization_config"
        qc = quantization_config
        if qc is None:
            cfg = read_json(Path(folder) / "config.json").get("quantization_config")
            qc = cfg if isinstance(cfg, dict) else {}
        method = str(qc.get("quant_method", "fp8")).lower()
        if method == "compressed-tensors":
            return cls(_compressed_tensors_block(qc, source))
        block = qc.get("weight_block_size")
        return cls(None if block is None else _block_size(block, f"{source}.weight_block_size"))

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
    def decode(
        self, logical_name: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        weight = stored_part(logical_name, parts)
        prefix = logical_name[: -len(".weight")] if logical_name.endswith(".weight") else None
        scale_inv = parts.get(f"{prefix}.weight_scale_inv") if prefix else None
        scale = parts.get(f"{prefix}.weight_scale") if prefix else None
        if scale_inv is None and scale is None:
            return cast_stored(logical_name, weight, dtype)

        def fail(why: str) -> EnhancedError:
            shapes = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in parts.items())
            return EnhancedError(f"bad FP8 tensors ({why}); shapes: {shapes}", culprit=logical_name)

        if weight.dim() != 2:
            raise fail("weight must be 2-D")
        if weight.dtype not in FP8_DTYPES:
            raise fail(f"scaled weight must be float8, got {weight.dtype}")
        out_f = weight.shape[0]
        if scale_inv is not None:
            block = self._require_block(logical_name)
            return _block_dequant(weight, scale_inv, block, dtype, fail)
        assert scale is not None
        if scale.numel() == 1 or tuple(scale.shape) in ((out_f,), (out_f, 1)):
            if scale.dim() > 2:
                raise fail("weight_scale must be a scalar, [1], [out] or [out, 1]")
            return _scaled_dequant(weight, scale, dtype)
        if self.weight_block_size is not None and scale.dim() == 2:
            return _block_dequant(weight, scale, self.weight_block_size, dtype, fail)
        raise fail(f"weight_scale must be a scalar, [1], [{out_f}] or [{out_f}, 1]")

    def _require_block(self, logical_name: str) -> tuple[int, int]:
        if self.weight_block_size is None:
            raise EnhancedError(
                "block-scaled FP8 weight but the checkpoint config has no weight_block_size",
                culprit=logical_name,
            )
        return self.weight_block_size  # type: ignore[return-value]

    def decoded_nbytes(
        self, logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype
    ) -> int:
        return stored_nbytes(logical_name, part_shapes, dtype)


def _block_dequant(weight, scale_inv, block, dtype, fail) -> torch.Tensor:
    out_f, in_f = weight.shape
    bo, bi = block
    expected = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale_inv.shape) != expected:
        raise fail(f"block scales must be {list(expected)} for block size [{bo}, {bi}]")
    if not scale_inv.dtype.is_floating_point:
        raise fail("scales must be float")
    if weight.is_cuda:
        from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import fp8_block_dequant

        return fp8_block_dequant(weight, scale_inv, (bo, bi), dtype)
    return fp8_block_dequant_ref(weight, scale_inv, (bo, bi), dtype)


def _scaled_dequant(weight, scale, dtype) -> torch.Tensor:
    if weight.is_cuda:
        from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import fp8_scaled_dequant

        return fp8_scaled_dequant(weight, scale, dtype)
    return fp8_scaled_dequant_ref(weight, scale, dtype)
