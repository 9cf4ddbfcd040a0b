"""FP8 tensor sets: the one description of their format and the one check of their shapes.

- block scales (``quant_method: "fp8"``, DeepSeek / Qwen FP8 style): ``X.weight`` float8 ``[out, in]``
  and ``X.weight_scale_inv`` float ``[ceil(out/bo), ceil(in/bi)]`` with ``weight_block_size: [bo, bi]``;
  ``w = weight * scale_inv[o // bo, i // bi]``;
- per-tensor / per-channel scales (``compressed-tensors``): ``X.weight`` and ``X.weight_scale``
  (scalar or ``[1]`` per tensor, ``[out]`` or ``[out, 1]`` per channel, or a block grid with
  ``block_structure``); ``w = weight * weight_scale``.

:func:`check_fp8_tensors` works on real or ``meta`` tensors, so the plan refuses a bad
scale from the header alone with the same code the decoder and the packed methods run.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.registry import read_json

__all__ = ["FP8_DTYPES", "SCALE_SUFFIXES", "FP8Format", "FP8Scale", "check_fp8_tensors"]

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class FP8Scale(str, enum.Enum):
    """How one FP8 weight is scaled."""

    BLOCK = "block"
    CHANNEL = "channel"
    TENSOR = "tensor"


@dataclass(frozen=True)
class FP8Format:
    """The quantization parameters of one FP8 checkpoint: its block shape, if scales are block-wise."""

    weight_block_size: tuple[int, int] | None = None

    def name(self, scale: FP8Scale) -> str:
        """Short name of the packed format of one weight, e.g. ``fp8-block128x128`` or ``fp8-channel``."""
        if scale == FP8Scale.BLOCK and self.weight_block_size is not None:
            return f"fp8-block{self.weight_block_size[0]}x{self.weight_block_size[1]}"
        return f"fp8-{scale.value}"

    @classmethod
    def from_checkpoint(cls, folder: Path, quantization_config: Mapping[str, Any] | None) -> FP8Format:
        """Read the folder's ``quantization_config`` (given, or from ``config.json``)."""
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


def check_fp8_tensors(
    name: str,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_is_inverse: bool,
    fmt: FP8Format,
) -> FP8Scale:
    """Validate one FP8 weight and its scale (``weight_scale_inv`` when ``scale_is_inverse``).

    Returns how the weight is scaled; raises ``EnhancedError`` naming ``name`` and the shapes.
    """

    def fail(why: str) -> EnhancedError:
        return EnhancedError(
            f"bad FP8 tensors ({why}); shapes: weight {tuple(weight.shape)} {weight.dtype}, "
            f"scale {tuple(scale.shape)} {scale.dtype}",
            culprit=name,
        )

    if weight.dim() != 2:
        raise fail("weight must be 2-D")
    if weight.dtype not in FP8_DTYPES:
        raise fail(f"scaled weight must be float8, got {weight.dtype}")
    if not scale.dtype.is_floating_point:
        raise fail("scales must be float")
    out_f, in_f = weight.shape
    if not scale_is_inverse:
        if scale.numel() == 1 and scale.dim() <= 2:
            return FP8Scale.TENSOR
        if tuple(scale.shape) in ((out_f,), (out_f, 1)):
            return FP8Scale.CHANNEL
        if fmt.weight_block_size is None or scale.dim() != 2:
            raise fail(f"weight_scale must be a scalar, [1], [{out_f}] or [{out_f}, 1]")
    if fmt.weight_block_size is None:
        raise fail("block-scaled FP8 weight but the checkpoint config has no weight_block_size")
    bo, bi = fmt.weight_block_size
    expected = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale.shape) != expected:
        raise fail(f"block scales must be {list(expected)} for block size [{bo}, {bi}]")
    return FP8Scale.BLOCK
