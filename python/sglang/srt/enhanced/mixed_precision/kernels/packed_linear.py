"""Weight-only packed linear layers (GPTQ integers, FP8 e4m3): ``y = x @ W^T (+ bias)``.

One kernel, two shapes: CUDA-core dot products over rows (``use_dot=False``), or tensor core
products on weight tiles decoded in registers, K split across programs for few rows (decode);
``pick_linear_config`` picks. Weights stay packed in the checkpoint layout
(``packed_weights``, without the expert dim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.kernels.act_order import unsort_rows
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.kernels.reference import (
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
    gptq_dequant_ref,
)
from sglang.srt.enhanced.mixed_precision.kernels.weight_tiles import (
    UNPACK_GATHER,
    _act_cols,
    _gptq_gemm_tile,
    _gptq_gemv_tile,
    _weight_tile,
    fp8_scale_uniform,
    gptq_group_mode,
    gptq_plane_mode,
    gptq_reads_planes,
    gptq_unpack_mode,
)


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    use_dot: bool = True
    # How a GPTQ tile is read: by word planes, or whole ("join", "repeat"; see weight_tiles).
    unpack: str = "planes"


# M (the batch's token count) is not specialised: a new prefill length reuses the compiled kernel.
@triton.jit(do_not_specialize=["M"])
def _packed_linear_kernel(
    x_ptr, out_ptr, bias_ptr, w_ptr, z_ptr, s_ptr, g_ptr,
    M, N, K, gs, zero_offset, BO, BI,
    sx_m, so_m,
    sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
    FMT: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr, GS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    UNIFORM: tl.constexpr, BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, ATOMIC: tl.constexpr, F32_DOT: tl.constexpr, PLANES: tl.constexpr,
    UNPACK: tl.constexpr, HAS_PERM: tl.constexpr,
):  # fmt: skip
    """``BLOCK_M`` rows x ``BLOCK_N`` outputs x one K split; ATOMIC adds float32 partial sums.
    HAS_PERM: rows sorted at load, ``g_ptr`` holds the activation column of each packed row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sx_m
    if PLANES and USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            acc = _gptq_gemm_tile(acc, x_rows, mask_m[:, None], k0, K, w_ptr, z_ptr, s_ptr, g_ptr, offs_n, mask_n, gs,
                                  zero_offset, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                  BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX, F32_DOT)  # fmt: skip
    elif PLANES:
        acc3 = tl.zeros((BLOCK_M, BLOCK_K * BITS // 32, BLOCK_N), tl.float32)
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            acc3 = _gptq_gemv_tile(acc3, x_rows, mask_m[:, None], k0, K, w_ptr, z_ptr, s_ptr, g_ptr, offs_n, mask_n,
                                   gs, zero_offset, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                   BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX)  # fmt: skip
        acc = tl.sum(acc3, axis=1)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cols = _act_cols(g_ptr, offs_k, sg_k, K, HAS_PERM)
            a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            v, s = _weight_tile(w_ptr, z_ptr, s_ptr, g_ptr, offs_n, mask_n, k0, K, gs, zero_offset, BO, BI,
                                sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                UNPACK)  # fmt: skip
            if USE_DOT:
                if F32_DOT:  # the Triton 3.3 interpreter multiplies bfloat16 tiles wrongly
                    acc += tl.dot(a.to(tl.float32), tl.trans(v)) * s[None, :]
                else:
                    acc += tl.dot(a, tl.trans(v.to(a.dtype))) * s[None, :]
            else:
                acc += tl.sum(a.to(tl.float32)[:, None, :] * v[None, :, :], axis=2) * s[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)
        acc += b[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * so_m + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _is_interpreted() -> bool:
    return type(_packed_linear_kernel).__name__ == "InterpretedFunction"


TARGET_PROGRAMS = 264
# Decode batches: K split until about this many programs run (each one K tile of one output tile).
DECODE_PROGRAMS = 4096
INTERPRETER = LinearConfig(16, 16, 32)


@functools.lru_cache(maxsize=4096)
def pick_linear_config(fmt: str, m: int, n: int, k: int, device: torch.device) -> LinearConfig:
    """Up to 16 rows: tensor-core tiles of 16 rows, K split down to one tile a program (on the H200
    this beat CUDA-core rows at 1 and 4 rows, benchmarks/RESULTS.md); more rows: fewer splits, then none."""
    if device.type != "cuda":
        return INTERPRETER
    if m <= 16:
        split = max(1, min(triton.cdiv(k, 64), DECODE_PROGRAMS // triton.cdiv(n, 64)))
        return LinearConfig(16, 64, 64, 4, 3, split)
    if m <= 64:
        tiles = triton.cdiv(n, 64)
        split = max(1, min(triton.cdiv(k, 256), triton.cdiv(TARGET_PROGRAMS, tiles)))
        return LinearConfig(32 if m <= 32 else 64, 64, 128, 4, 3, split)
    return LinearConfig(64 if m <= 256 else 128, 128, 64, 8 if m > 256 else 4, 3)


def _weight_args(w: GPTQExperts | FP8Experts, block_k: int, unpack: str) -> tuple[tuple, tuple, tuple, dict]:
    if isinstance(w, GPTQExperts):
        k = w.in_features
        gs = k if w.group_size == -1 or w.group_size >= k else w.group_size
        planes = gptq_reads_planes(w.bits, unpack, w.perm is not None)
        if planes:
            mode = gptq_plane_mode(w.group_size, k, block_k, w.bits, w.g_idx is not None)
        else:
            mode = gptq_group_mode(w.group_size, k, block_k, w.g_idx is not None)
        g = w.row_order.to(torch.int32) if w.row_order is not None else None
        ptrs = (w.qweight, w.qzeros, w.scales, g if g is not None else w.qweight)
        strides = (*w.qweight.stride(), *w.qzeros.stride(), *w.scales.stride(), g.stride(0) if g is not None else 0)
        meta = dict(FMT=0, BITS=w.bits, GROUP_MODE=mode, GS=gs if mode == 2 else 1, HAS_G_IDX=w.g_idx is not None,
                    UNIFORM=True, BLOCKWISE=False, PLANES=planes, UNPACK=gptq_unpack_mode(w.bits, unpack),
                    HAS_PERM=w.perm is not None)  # fmt: skip
        return ptrs, (gs, w.zero_offset, 1, 1), strides, meta
    bo, bi = w.block_size if w.block_size is not None else (1, 1)
    s = w.scale.reshape(-1) if w.block_size is None else w.scale
    ss = (s.stride(1), s.stride(0)) if w.block_size is not None else (0, s.stride(0) if s.numel() > 1 else 0)
    strides = (w.weight.stride(1), w.weight.stride(0), 0, 0, *ss, 0)
    meta = dict(FMT=1, BITS=8, GROUP_MODE=1, GS=1, HAS_G_IDX=False,
                UNIFORM=fp8_scale_uniform(w.block_size, block_k), BLOCKWISE=w.block_size is not None, PLANES=False,
                UNPACK=UNPACK_GATHER, HAS_PERM=False)  # fmt: skip
    return (w.weight, w.weight, s, w.weight), (1, 0, bo, bi), strides, meta


def _packed_linear(x, w, bias, fmt: str, config: LinearConfig | None) -> torch.Tensor:
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise EnhancedError(f"x has {x.shape[-1]} features, the weight takes {k}", culprit="x")
    if bias is not None and tuple(bias.shape) != (n,):
        raise EnhancedError(f"bias must be [{n}], got {tuple(bias.shape)}", culprit="bias")
    if not x.is_cuda and not _is_interpreted():
        raise EnhancedError("the packed linear kernel needs CUDA tensors or TRITON_INTERPRET=1 set before import",
                            culprit="x")  # fmt: skip
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    cfg = config or pick_linear_config(fmt, m, n, k, x.device)
    block_k = cfg.block_k
    planes = isinstance(w, GPTQExperts) and gptq_reads_planes(w.bits, cfg.unpack, w.perm is not None)
    if cfg.use_dot and planes and not _is_interpreted():
        block_k = max(block_k, 16 * 32 // w.bits)  # word-plane tiles feed tensor cores bits/32 as deep
    ptrs, scalars, strides, meta = _weight_args(w, block_k, cfg.unpack)
    k_tiles = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles)))
    split = triton.cdiv(k_tiles, per_split)
    target = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _packed_linear_kernel[grid](
        x2, target, bias if bias is not None else x2, *ptrs,
        m, n, k, *scalars, x2.stride(0), target.stride(0), *strides,
        **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        USE_DOT=cfg.use_dot, TILES_PER_SPLIT=per_split, ATOMIC=split > 1, F32_DOT=_is_interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:
        out.copy_(target)
    return out.reshape(*lead, n)


def gptq_linear(x: torch.Tensor, w: GPTQExperts, bias: torch.Tensor | None = None, *,
                config: LinearConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``x [..., K] @ W^T (+ bias)`` for one GPTQ weight (``qweight [K*bits/32, N]``, no expert dim)."""
    if w.qweight.dim() != 2:
        raise EnhancedError(f"expected a 2-D qweight, got {tuple(w.qweight.shape)}", culprit="qweight")
    return _packed_linear(x, w, bias, f"int{w.bits}", config)


def fp8_linear(x: torch.Tensor, w: FP8Experts, bias: torch.Tensor | None = None, *,
               config: LinearConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``x [..., K] @ W^T (+ bias)`` for one FP8 weight ``[N, K]`` (block or per-channel scales)."""
    if w.weight.dim() != 2:
        raise EnhancedError(f"expected a 2-D FP8 weight, got {tuple(w.weight.shape)}", culprit="weight")
    return _packed_linear(x, w, bias, "fp8_block" if w.block_size is not None else "fp8_channel", config)


def _linear_ref(x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w64.T
    return y + bias.double() if bias is not None else y


def gptq_linear_ref(x: torch.Tensor, w: GPTQExperts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference of :func:`gptq_linear`."""
    w64 = gptq_dequant_ref(w.qweight, w.qzeros, w.scales, w.g_idx, bits=w.bits, group_size=w.group_size,
                           zero_offset=w.zero_offset, out_dtype=torch.float64)  # fmt: skip
    return _linear_ref(x, unsort_rows(w64, w), bias)


def fp8_linear_ref(x: torch.Tensor, w: FP8Experts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference of :func:`fp8_linear`."""
    if w.block_size is None:
        w64 = fp8_scaled_dequant_ref(w.weight, w.scale, torch.float64)
    else:
        w64 = fp8_block_dequant_ref(w.weight, w.scale, w.block_size, torch.float64)
    return _linear_ref(x, w64, bias)
