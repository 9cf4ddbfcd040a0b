"""Triton FP8 dequantization: block-scaled (``weight_scale_inv``) and per-tensor/per-channel scaled.

Block-scaled: ``w[o, i] = weight[o, i] * scale_inv[o // bo, i // bi]`` (edge blocks may be
partial). Scaled: ``w[o, i] = weight[o, i] * scale`` with one scale per tensor or per
output channel. One program writes a ``[BLOCK_M, BLOCK_N]`` output tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Tile configs (BLOCK_M, BLOCK_N, num_warps), largest first; a launch takes the first that gives
# at least MIN_PROGRAMS_PER_SM programs per SM (benchmarks/NOTES_dequant.md).
TILE_LADDER = ((64, 128, 4), (32, 128, 4), (32, 64, 4), (16, 64, 2))
MIN_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=1024)
def pick_config(m: int, n: int, device: torch.device) -> tuple[int, int, int]:
    if device.type != "cuda":
        return TILE_LADDER[0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for cfg in TILE_LADDER:
        if triton.cdiv(m, cfg[0]) * triton.cdiv(n, cfg[1]) >= MIN_PROGRAMS_PER_SM * sms:
            return cfg
    return TILE_LADDER[-1]


@triton.jit
def _fp8_block_dequant_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    BO,
    BI,
    sw_m,
    sw_n,
    ss_m,
    ss_n,
    so_m,
    so_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    w = tl.load(w_ptr + offs_m[:, None] * sw_m + offs_n[None, :] * sw_n, mask=mask, other=0.0).to(tl.float32)
    if UNIFORM:  # the tile lies inside one scale block
        s = tl.load(s_ptr + ((pid_m * BLOCK_M) // BO) * ss_m + ((pid_n * BLOCK_N) // BI) * ss_n)
    else:
        s = tl.load(
            s_ptr + (offs_m // BO)[:, None] * ss_m + (offs_n // BI)[None, :] * ss_n, mask=mask, other=0.0
        )
    out = w * s.to(tl.float32)
    tl.store(
        out_ptr + offs_m[:, None] * so_m + offs_n[None, :] * so_n, out.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _fp8_scaled_dequant_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    sw_m,
    sw_n,
    ss_m,
    so_m,
    so_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    w = tl.load(w_ptr + offs_m[:, None] * sw_m + offs_n[None, :] * sw_n, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs_m * ss_m, mask=mask_m, other=0.0).to(tl.float32)  # ss_m = 0: per tensor
    out = w * s[:, None]
    tl.store(
        out_ptr + offs_m[:, None] * so_m + offs_n[None, :] * so_n, out.to(out_ptr.dtype.element_ty), mask=mask
    )


def _is_interpreted() -> bool:
    return type(_fp8_block_dequant_kernel).__name__ == "InterpretedFunction"


def _check_weight(weight_fp8: torch.Tensor) -> None:
    if weight_fp8.dim() != 2 or weight_fp8.dtype not in FP8_DTYPES:
        raise EnhancedError(
            f"expected a 2-D float8 weight, got {tuple(weight_fp8.shape)} {weight_fp8.dtype}",
            culprit="weight",
        )


def _use_triton(weight_fp8: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return weight_fp8.is_cuda
    if use_triton and not weight_fp8.is_cuda and not _is_interpreted():
        raise EnhancedError(
            "the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1 set before import",
            culprit="use_triton",
        )
    return use_triton


def fp8_block_dequant(
    weight_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    out_dtype: torch.dtype,
    *,
    use_triton: bool | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Block-scaled FP8 ``[out, in]`` -> ``out_dtype``; ``scale_inv`` is ``[ceil(out/bo), ceil(in/bi)]``."""
    _check_weight(weight_fp8)
    bo, bi = (int(v) for v in block_size)
    m, n = weight_fp8.shape
    if bo <= 0 or bi <= 0 or tuple(scale_inv.shape) != (triton.cdiv(m, bo), triton.cdiv(n, bi)):
        raise EnhancedError(
            f"scale_inv {tuple(scale_inv.shape)} does not match weight {(m, n)} with block size {(bo, bi)}",
            culprit="scale_inv",
        )
    if not _use_triton(weight_fp8, use_triton):
        return fp8_block_dequant_ref(weight_fp8, scale_inv, (bo, bi), out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=weight_fp8.device)
    if out.numel() == 0:
        return out
    block_m, block_n, num_warps = config or pick_config(m, n, weight_fp8.device)
    uniform = bo % block_m == 0 and bi % block_n == 0
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_block_dequant_kernel[grid](
        weight_fp8, scale_inv, out, m, n, bo, bi,
        *weight_fp8.stride(), *scale_inv.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, UNIFORM=uniform, num_warps=num_warps,
    )  # fmt: skip
    return out


def fp8_scaled_dequant(
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    use_triton: bool | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """FP8 ``[out, in]`` times a per-tensor (scalar/``[1]``) or per-channel (``[out]``/``[out, 1]``) scale."""
    _check_weight(weight_fp8)
    m, n = weight_fp8.shape
    if weight_scale.numel() == 1:
        per_channel = False
    elif weight_scale.numel() == m and tuple(weight_scale.shape) in ((m,), (m, 1)):
        per_channel = True
    else:
        raise EnhancedError(
            f"weight_scale {tuple(weight_scale.shape)} is neither per-tensor nor per-channel for weight {(m, n)}",
            culprit="weight_scale",
        )
    if not _use_triton(weight_fp8, use_triton):
        return fp8_scaled_dequant_ref(weight_fp8, weight_scale, out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=weight_fp8.device)
    if out.numel() == 0:
        return out
    scale = weight_scale.reshape(-1)
    block_m, block_n, num_warps = config or pick_config(m, n, weight_fp8.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_scaled_dequant_kernel[grid](
        weight_fp8, scale, out, m, n,
        *weight_fp8.stride(), scale.stride(0) if per_channel else 0, *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return out
