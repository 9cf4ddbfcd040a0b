"""Dequantize stored tensors on the device they are on: Triton kernels on CUDA, the torch references elsewhere.

The one place where decoding picks an implementation; the decoders (decoded serving,
the Python API) and the CPU / fallback path of packed serving call these.
"""

from __future__ import annotations

import torch

from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
    gptq_dequant_ref,
)

__all__ = ["dequant_fp8_block", "dequant_fp8_scaled", "dequant_gptq"]


def dequant_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    zero_offset: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """GPTQ weight ``[..., out, in]`` in ``out_dtype``; 2-D or stacked 3-D inputs."""
    kwargs = dict(bits=bits, group_size=group_size, zero_offset=zero_offset, out_dtype=out_dtype)
    if qweight.is_cuda:
        from sglang.srt.enhanced.mixed_precision.kernels.gptq_dequant import (
            gptq_dequant,
            gptq_dequant_batched,
        )

        fn = gptq_dequant_batched if qweight.dim() == 3 else gptq_dequant
        return fn(qweight, qzeros, scales, g_idx, **kwargs)
    return gptq_dequant_ref(qweight, qzeros, scales, g_idx, **kwargs)


def dequant_fp8_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int], out_dtype: torch.dtype
) -> torch.Tensor:
    """``weight * scale_inv[o // bo, i // bi]`` in ``out_dtype``."""
    if weight.is_cuda and weight.dim() == 2:
        from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import fp8_block_dequant

        return fp8_block_dequant(weight, scale_inv, tuple(block_size), out_dtype)
    return fp8_block_dequant_ref(weight, scale_inv, tuple(block_size), out_dtype)


def dequant_fp8_scaled(weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor or per-channel scaled FP8 weight in ``out_dtype``."""
    if weight.is_cuda and weight.dim() == 2:
        from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import fp8_scaled_dequant

        return fp8_scaled_dequant(weight, scale, out_dtype)
    return fp8_scaled_dequant_ref(weight, scale, out_dtype)
