"""Fused MoE over packed experts (GPTQ integers, FP8 e4m3): gate/up GEMM with the activation in
its epilogue, down GEMM with the routing-weighted top-k sum in its epilogue.

Three kernel shapes, chosen by batch size (``moe_configs.pick_moe_config``):

- ``gemv`` (decode, a few tokens): one program per (token, slot) pair, output tile and K split,
  no alignment and no padding. A split gate/up projection writes float32 partial sums and a
  small kernel adds them and applies the activation; a split down projection adds atomically.
- ``grouped`` (tens of tokens, a few pairs per expert): the gemv's CUDA-core products over
  ``BLOCK_M``-row blocks of one expert's pairs (``moe_align``), one K tile a program decoded once
  for all its rows, so an expert that several pairs chose is read once.
- ``gemm`` (more tokens): pairs grouped by expert in ``BLOCK_M``-row blocks (``moe_align``), tensor
  core products on weight tiles decoded in registers, K split the same way where asked (a batch
  of a few pairs per expert reads each expert once over many programs).

Both accumulate in float32. The gate/up kernel also clears the float32 output that the down
kernel adds into (atomically); the result is cast to the activation dtype at the end. A layer
whose experts come in several formats runs one launch per format and projection
(:func:`fused_moe_sets`), side by side on CUDA streams of their own; each maps the routed
global expert ids to its own (``HAS_MAP``) and skips the pairs of other formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.kernels.act_order import unsort_rows
from sglang.srt.enhanced.mixed_precision.kernels.moe_align import moe_align_block_size
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import GemmConfig, MoEConfig, pick_moe_config
from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.kernels.reference import fp8_block_dequant_ref, gptq_dequant_ref
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

ACTIVATIONS = {"silu": 0, "gelu": 1}
ZERO_BLOCK = 512


@triton.jit
def _activate(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    else:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _clear(zero_ptr, zero_numel, zero_chunk, lin):
    """Program ``lin`` zeroes its ``zero_chunk`` elements of the float32 output."""
    start = lin * zero_chunk
    stop = tl.minimum(start + zero_chunk, zero_numel)
    i = start
    while i < stop:  # a while loop: the Triton interpreter runs it with scalar bounds too
        offs = i + tl.arange(0, 512)
        tl.store(zero_ptr + offs, tl.zeros((512,), tl.float32), mask=offs < stop)
        i += 512


@triton.jit
def _set_index(e, map_ptr, num_experts, HAS_MAP: tl.constexpr):
    """Index of global expert ``e`` (int64) in this set, or -1 where the set does not hold it;
    ids outside ``[0, num_experts)`` (pairs of other ranks) are -1 too."""
    inside = (e >= 0) & (e < num_experts)
    if HAS_MAP:
        e = tl.load(map_ptr + tl.where(inside, e, 0)).to(tl.int64)
    return tl.where(inside, e, -1)


@triton.jit
def _block_expert(block, BLOCK_M: tl.constexpr, num_post_ptr, expert_ids_ptr, map_ptr, HAS_MAP: tl.constexpr):
    """This set's index (int64) of the expert of aligned block ``block``; -1 past the aligned rows,
    for padding blocks and for experts the set does not hold."""
    e = tl.load(expert_ids_ptr + block).to(tl.int64)
    e = tl.where(block * BLOCK_M < tl.load(num_post_ptr), e, -1)
    if HAS_MAP:
        e = tl.where(e >= 0, tl.load(map_ptr + tl.maximum(e, 0)).to(tl.int64), -1)
    return e


@triton.jit
def _gemv_store(acc, acc_up, pair, ok, pid_k, offs_n, mask_n, out_ptr, topk_w_ptr, N, num_pairs, top_k, so_m,
                GATED: tl.constexpr, SPLIT_GATED: tl.constexpr, ACT: tl.constexpr):  # fmt: skip
    """The result of one pair ``pair`` (written where ``ok``): float32 partial sums of a split gate/up,
    the activated gate x up, or the routing-weighted down projection added into its token's row."""
    mask = mask_n & ok
    if SPLIT_GATED:
        part = out_ptr + (pid_k * num_pairs + pair).to(tl.int64) * so_m
        tl.store(part + offs_n, acc, mask=mask)
        tl.store(part + N + offs_n, acc_up, mask=mask)
    elif GATED:
        h = _activate(acc, ACT) * acc_up
        tl.store(out_ptr + pair.to(tl.int64) * so_m + offs_n, h.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        wgt = tl.load(topk_w_ptr + pair, mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + (pair // top_k).to(tl.int64) * so_m + offs_n, acc * wgt, mask=mask)


# Integers that follow the batch's token count are not specialised (Triton compiles a variant
# per "== 1" / "divisible by 16"): a new prefill length reuses the compiled kernels.
@triton.jit(do_not_specialize=["num_pairs", "zero_numel", "zero_chunk"])
def _fused_moe_gemv_kernel(
    a_ptr, out_ptr, zero_ptr, topk_ids_ptr, topk_w_ptr, map_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    w_ptr, z_ptr, s_ptr, g_ptr,
    N, K, num_experts, num_pairs, top_k, zero_numel, zero_chunk, gs, zero_offset, BO, BI,
    sa_m, so_m,
    sw_e, sw_k, sw_n, sz_e, sz_g, sz_c, ss_e, ss_k, ss_n, sg_e, sg_half, sg_k,
    FMT: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_MODE: tl.constexpr, GS: tl.constexpr, HAS_G_IDX: tl.constexpr, UNIFORM: tl.constexpr,
    BLOCKWISE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
    PLANES: tl.constexpr, SPLIT_GATED: tl.constexpr, HAS_MAP: tl.constexpr, UNPACK: tl.constexpr,
    GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PERM: tl.constexpr,
):  # fmt: skip
    """One (token, slot) pair ``p`` x ``BLOCK_N`` outputs x one K split ``s``; GROUPED: one
    ``BLOCK_M``-row block of an expert's pairs (``moe_align``) x outputs x one K tile, the tile
    decoded once for all its rows (CUDA cores, no padding to tensor core shapes).

    GATED: ``out[p, n] = act(x[p // top_k] . W[e, n]) * (x[p // top_k] . W[e, N + n])``; with
    SPLIT_GATED the two dot products over split ``s`` go to ``out[s, p, n]`` / ``out[s, p, N + n]``
    (float32) instead, for :func:`_split_act_kernel`;
    else ``out[p // top_k, n] += topk_w[p] * (a[p] . W[e, n])`` (float32, atomic).
    HAS_MAP: ``e = map[topk_ids[p]]`` (this set's index of a global expert, -1: not in the set).
    HAS_PERM: rows sorted at load (``act_order``); ``g_ptr`` holds ``perm``, the activation column of
    each packed row (the whole-tile reads only).
    """
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GATED:
        _clear(zero_ptr, zero_numel, zero_chunk, (p * tl.num_programs(1) + pid_n) * tl.num_programs(2) + pid_k)
    if GROUPED:
        e = _block_expert(p, BLOCK_M, num_post_ptr, expert_ids_ptr, map_ptr, HAS_MAP)
    else:
        e = _set_index(tl.load(topk_ids_ptr + p).to(tl.int64), map_ptr, num_experts, HAS_MAP)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_e = w_ptr + e * sw_e
    z_e = z_ptr + e * sz_e
    s_e = s_ptr + e * ss_e
    g_e = g_ptr + e * sg_e
    if GROUPED:  # one K tile: decoded once, applied to each row of the block
        k0 = pid_k * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v, s = _weight_tile(w_e, z_e, s_e, g_e, offs_n, mask_n, k0, K, gs, zero_offset, BO, BI,
                            sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                            FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                            UNPACK)  # fmt: skip
        if GATED:
            v_up, s_up = _weight_tile(w_e, z_e, s_e, g_e + sg_half, offs_n + N, mask_n, k0, K, gs, zero_offset,
                                      BO, BI, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                      FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                      UNPACK)  # fmt: skip
        cols = _act_cols(g_e, offs_k, sg_k, K, HAS_PERM)
        cols_up = _act_cols(g_e + sg_half, offs_k, sg_k, K, HAS_PERM)
        for m in tl.static_range(BLOCK_M):
            pair = tl.load(sorted_ids_ptr + p * BLOCK_M + m)
            ok = pair < num_pairs
            row = pair // top_k if GATED else pair
            a_row = a_ptr + row.to(tl.int64) * sa_m
            x = tl.load(a_row + cols, mask=(offs_k < K) & ok, other=0.0).to(tl.float32)
            acc = s * tl.sum(v * x[None, :], axis=1)
            acc_up = acc
            if GATED:
                if HAS_PERM:
                    x = tl.load(a_row + cols_up, mask=(offs_k < K) & ok, other=0.0).to(tl.float32)
                acc_up = s_up * tl.sum(v_up * x[None, :], axis=1)
            _gemv_store(acc, acc_up, pair, ok, pid_k, offs_n, mask_n, out_ptr, topk_w_ptr, N, num_pairs, top_k,
                        so_m, GATED, SPLIT_GATED, ACT)  # fmt: skip
        return
    row = p // top_k if GATED else p
    a_row = a_ptr + row.to(tl.int64) * sa_m
    if PLANES:
        VPW: tl.constexpr = 32 // BITS
        acc3 = tl.zeros((1, BLOCK_K // VPW, BLOCK_N), tl.float32)
        acc3_up = tl.zeros((1, BLOCK_K // VPW, BLOCK_N), tl.float32)
        x_rows = a_row + tl.zeros((1, 1), tl.int64)
        row_ok = tl.full((1, 1), 1, tl.int1)
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            acc3 = _gptq_gemv_tile(acc3, x_rows, row_ok, k0, K, w_e, z_e, s_e, g_e, offs_n, mask_n, gs, zero_offset,
                                   sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k, BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX)  # fmt: skip
            if GATED:
                acc3_up = _gptq_gemv_tile(acc3_up, x_rows, row_ok, k0, K, w_e, z_e, s_e, g_e + sg_half, offs_n + N,
                                          mask_n, gs, zero_offset, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                          BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX)  # fmt: skip
        acc = tl.reshape(tl.sum(acc3, axis=1), (BLOCK_N,))
        acc_up = tl.reshape(tl.sum(acc3_up, axis=1), (BLOCK_N,))
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc_up = tl.zeros((BLOCK_N,), tl.float32)
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(a_row + _act_cols(g_e, offs_k, sg_k, K, HAS_PERM), mask=offs_k < K, other=0.0).to(tl.float32)
            v, s = _weight_tile(w_e, z_e, s_e, g_e, offs_n, mask_n, k0, K, gs, zero_offset, BO, BI,
                                sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                UNPACK)  # fmt: skip
            acc += s * tl.sum(v * x[None, :], axis=1)
            if GATED:
                if HAS_PERM:
                    cols_up = _act_cols(g_e + sg_half, offs_k, sg_k, K, HAS_PERM)
                    x = tl.load(a_row + cols_up, mask=offs_k < K, other=0.0).to(tl.float32)
                v, s = _weight_tile(w_e, z_e, s_e, g_e + sg_half, offs_n + N, mask_n, k0, K, gs, zero_offset, BO, BI,
                                    sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                    FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                    UNPACK)  # fmt: skip
                acc_up += s * tl.sum(v * x[None, :], axis=1)
    _gemv_store(acc, acc_up, p, p >= 0, pid_k, offs_n, mask_n, out_ptr, topk_w_ptr, N, num_pairs, top_k, so_m,
                GATED, SPLIT_GATED, ACT)  # fmt: skip


@triton.jit(do_not_specialize=["pairs"])
def _split_act_kernel(part_ptr, out_ptr, topk_ids_ptr, map_ptr, N, pairs, num_experts, sp_m, so_m,
                      SPLITS: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, HAS_MAP: tl.constexpr):  # fmt: skip
    """``out[p, n] = act(sum_s part[s, p, n]) * sum_s part[s, p, N + n]`` for one pair and ``BLOCK`` outputs.

    Pairs the gate/up kernel skipped (another rank's, or another set's) are left alone.
    """
    p = tl.program_id(0)
    if _set_index(tl.load(topk_ids_ptr + p).to(tl.int64), map_ptr, num_experts, HAS_MAP) < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLITS):
        row = part_ptr + (s * pairs + p).to(tl.int64) * sp_m
        g += tl.load(row + offs, mask=mask, other=0.0)
        u += tl.load(row + N + offs, mask=mask, other=0.0)
    h = _activate(g, ACT) * u
    tl.store(out_ptr + p.to(tl.int64) * so_m + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_pairs", "zero_numel", "zero_chunk"])
def _fused_moe_gemm_kernel(
    a_ptr, out_ptr, zero_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, topk_w_ptr, map_ptr,
    w_ptr, z_ptr, s_ptr, g_ptr,
    N, K, num_pairs, top_k, zero_numel, zero_chunk, gs, zero_offset, BO, BI,
    sa_m, so_m,
    sw_e, sw_k, sw_n, sz_e, sz_g, sz_c, ss_e, ss_k, ss_n, sg_e, sg_half, sg_k,
    FMT: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr, GS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    UNIFORM: tl.constexpr, BLOCKWISE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, F32_DOT: tl.constexpr, PLANES: tl.constexpr, HAS_MAP: tl.constexpr,
    UNPACK: tl.constexpr, SPLIT_GATED: tl.constexpr, HAS_PERM: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M``-row block of one expert's pairs x ``BLOCK_N`` outputs x one K split (see the
    gemv kernel: a split gate/up projection writes float32 partial sums, a split down one adds)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED:
        _clear(zero_ptr, zero_numel, zero_chunk, pid * tl.num_programs(1) + pid_k)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e = _block_expert(pid_m, BLOCK_M, num_post_ptr, expert_ids_ptr, map_ptr, HAS_MAP)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    mask_m = pair < num_pairs
    row = pair // top_k if GATED else pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_e = w_ptr + e * sw_e
    z_e = z_ptr + e * sz_e
    s_e = s_ptr + e * ss_e
    g_e = g_ptr + e * sg_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if PLANES:
        a_rows = a_ptr + row[:, None] * sa_m
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            acc = _gptq_gemm_tile(acc, a_rows, mask_m[:, None], k0, K, w_e, z_e, s_e, g_e, offs_n, mask_n, gs,
                                  zero_offset, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                  BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX, F32_DOT)  # fmt: skip
            if GATED:
                acc_up = _gptq_gemm_tile(acc_up, a_rows, mask_m[:, None], k0, K, w_e, z_e, s_e, g_e + sg_half,
                                         offs_n + N, mask_n, gs, zero_offset, sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                         BITS, BLOCK_K, GROUP_MODE, HAS_G_IDX, F32_DOT)  # fmt: skip
    else:
        for kt in range(0, TILES_PER_SPLIT):
            k0 = (pid_k * TILES_PER_SPLIT + kt) * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_a = mask_m[:, None] & (offs_k < K)[None, :]
            a_rows = a_ptr + row[:, None] * sa_m
            a = tl.load(a_rows + _act_cols(g_e, offs_k, sg_k, K, HAS_PERM)[None, :], mask=mask_a, other=0.0)
            if F32_DOT:  # the Triton 3.3 interpreter multiplies bfloat16 tiles wrongly
                a = a.to(tl.float32)
            v, s = _weight_tile(w_e, z_e, s_e, g_e, offs_n, mask_n, k0, K, gs, zero_offset, BO, BI,
                                sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                UNPACK)  # fmt: skip
            acc += tl.dot(a, tl.trans(v.to(a.dtype))) * s[None, :]
            if GATED:
                if HAS_PERM:
                    a = tl.load(a_rows + _act_cols(g_e + sg_half, offs_k, sg_k, K, HAS_PERM)[None, :], mask=mask_a,
                                other=0.0)  # fmt: skip
                    if F32_DOT:
                        a = a.to(tl.float32)
                v, s = _weight_tile(w_e, z_e, s_e, g_e + sg_half, offs_n + N, mask_n, k0, K, gs, zero_offset, BO, BI,
                                    sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                                    FMT, BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNIFORM, BLOCKWISE,
                                    UNPACK)  # fmt: skip
                acc_up += tl.dot(a, tl.trans(v.to(a.dtype))) * s[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_GATED:
        part = out_ptr + (pid_k * num_pairs + pair)[:, None] * so_m + offs_n[None, :]
        tl.store(part, acc, mask=mask)
        tl.store(part + N, acc_up, mask=mask)
    elif GATED:
        h = _activate(acc, ACT) * acc_up
        tl.store(out_ptr + pair[:, None] * so_m + offs_n[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        wgt = tl.load(topk_w_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + (pair // top_k)[:, None] * so_m + offs_n[None, :], acc * wgt[:, None], mask=mask)


def _is_interpreted() -> bool:
    return type(_fused_moe_gemm_kernel).__name__ == "InterpretedFunction"


class _WeightArgs:
    """Kernel arguments of one stacked packed weight (pointers, strides, constexprs); ``unpack``:
    how a GPTQ tile is read (``GemmConfig.unpack``)."""

    def __init__(self, w: GPTQExperts | FP8Experts, block_k: int, unpack: str = "planes") -> None:
        if isinstance(w, GPTQExperts):
            k = w.in_features
            gs = k if w.group_size == -1 or w.group_size >= k else w.group_size
            self.planes = gptq_reads_planes(w.bits, unpack, w.perm is not None)
            if self.planes:
                mode = gptq_plane_mode(w.group_size, k, block_k, w.bits, w.g_idx is not None)
            else:
                mode = gptq_group_mode(w.group_size, k, block_k, w.g_idx is not None)
            g = w.row_order
            if g is not None and g.dtype != torch.int32:
                g = g.to(torch.int32)
            half = g is not None and g.dim() == 3
            self.ptrs = (w.qweight, w.qzeros, w.scales, g if g is not None else w.qweight)
            self.scalars = (gs, w.zero_offset, 1, 1)
            g_strides = (g.stride(0), g.stride(1) if half else 0, g.stride(-1)) if g is not None else (0, 0, 0)
            self.strides = (*w.qweight.stride(), *w.qzeros.stride(), *w.scales.stride(), *g_strides)
            self.meta = dict(FMT=0, BITS=w.bits, GROUP_MODE=mode, GS=gs if mode == 2 else 1,
                             HAS_G_IDX=w.g_idx is not None, UNIFORM=True, BLOCKWISE=False, PLANES=self.planes,
                             UNPACK=gptq_unpack_mode(w.bits, unpack), HAS_PERM=w.perm is not None)  # fmt: skip
        else:
            self.planes = False
            bo, bi = w.block_size if w.block_size is not None else (1, 1)
            s = w.scale
            ss = (s.stride(0), s.stride(2), s.stride(1)) if w.block_size is not None else (s.stride(0), 0, s.stride(1))
            self.ptrs = (w.weight, w.weight, s, w.weight)
            self.scalars = (1, 0, bo, bi)
            wst = w.weight.stride()
            self.strides = (wst[0], wst[2], wst[1], 0, 0, 0, *ss, 0, 0, 0)
            self.meta = dict(FMT=1, BITS=8, GROUP_MODE=1, GS=1, HAS_G_IDX=False,
                             UNIFORM=fp8_scale_uniform(w.block_size, block_k), BLOCKWISE=w.block_size is not None,
                             PLANES=False, UNPACK=UNPACK_GATHER, HAS_PERM=False)  # fmt: skip


ACT_BLOCK = 256


def _k_splits(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K tiles per split, splits) for ``split_k`` asked over ``ceil(k / block_k)`` tiles."""
    k_tiles = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return per_split, triton.cdiv(k_tiles, per_split)


def _split_act(dst, out, topk_ids, expert_map, n, pairs, num_experts, split, act) -> None:
    """Add a split gate/up projection's float32 partials ``dst [split, pairs, 2N]`` and activate."""
    _split_act_kernel[(pairs, triton.cdiv(n, ACT_BLOCK))](
        dst, out, topk_ids, expert_map if expert_map is not None else topk_ids, n, pairs, num_experts,
        dst.stride(1), out.stride(0), SPLITS=split, ACT=act, BLOCK=ACT_BLOCK, HAS_MAP=expert_map is not None)


def _launch_gemv(a, out, zero, topk_ids, topk_w, w, expert_map, n, k, num_experts, top_k, cfg: GemmConfig, gated,
                 act, align=None, block_m=1):  # fmt: skip
    """Per-pair gemv, or with ``align`` (``moe_align`` in ``block_m``-row blocks) the grouped one:
    one K tile a program, the word-plane read replaced by the whole-tile one."""
    grouped = align is not None
    unpack = "join" if grouped and cfg.unpack == "planes" else cfg.unpack
    wa = _WeightArgs(w, cfg.block_k, unpack)
    pairs = topk_ids.numel()
    per_split, split = _k_splits(k, cfg.block_k, triton.cdiv(k, cfg.block_k) if grouped else cfg.split_k)
    split_gated = gated and split > 1
    # A split gate/up projection writes float32 partials [split, pairs, 2N], added up by the act kernel.
    dst = torch.empty((split, pairs, 2 * n), dtype=torch.float32, device=a.device) if split_gated else out
    sorted_ids, expert_ids, num_post = align if grouped else (topk_ids, topk_ids, topk_ids)
    grid = (expert_ids.numel() if grouped else pairs, triton.cdiv(n, cfg.block_n), split)
    _fused_moe_gemv_kernel[grid](
        a, dst, zero, topk_ids, topk_w, expert_map if expert_map is not None else topk_ids,
        sorted_ids, expert_ids, num_post, *wa.ptrs,
        n, k, num_experts, pairs, top_k, zero.numel(), triton.cdiv(zero.numel(), grid[0] * grid[1] * grid[2]),
        *wa.scalars, a.stride(0), dst.stride(-2), *wa.strides,
        **wa.meta, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATED=gated, ACT=act, TILES_PER_SPLIT=per_split,
        SPLIT_GATED=split_gated, HAS_MAP=expert_map is not None, GROUPED=grouped, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split_gated:
        _split_act(dst, out, topk_ids, expert_map, n, pairs, num_experts, split, act)


def _dot_block_k(w: GPTQExperts | FP8Experts, block_k: int, unpack: str) -> int:
    """Word-plane tiles feed tensor cores ``block_k * bits / 32`` rows deep: at least 16 on a GPU."""
    if isinstance(w, GPTQExperts) and gptq_reads_planes(w.bits, unpack, w.perm is not None) and not _is_interpreted():
        return max(block_k, 16 * 32 // w.bits)
    return block_k


def _launch_gemm(a, out, zero, align, topk_ids, topk_w, w, expert_map, n, k, num_experts, top_k, block_m,
                 cfg: GemmConfig, gated, act):  # fmt: skip
    sorted_ids, expert_ids, num_post = align
    pairs = topk_ids.numel()
    block_k = _dot_block_k(w, cfg.block_k, cfg.unpack)
    wa = _WeightArgs(w, block_k, cfg.unpack)
    per_split, split = _k_splits(k, block_k, cfg.split_k)
    split_gated = gated and split > 1
    dst = torch.empty((split, pairs, 2 * n), dtype=torch.float32, device=a.device) if split_gated else out
    grid = (expert_ids.numel() * triton.cdiv(n, cfg.block_n), split)
    _fused_moe_gemm_kernel[grid](
        a, dst, zero, sorted_ids, expert_ids, num_post, topk_w, expert_map if expert_map is not None else expert_ids,
        *wa.ptrs,
        n, k, pairs, top_k, zero.numel(), triton.cdiv(zero.numel(), grid[0] * grid[1]), *wa.scalars,
        a.stride(0), dst.stride(-2), *wa.strides,
        **wa.meta, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GATED=gated, ACT=act,
        TILES_PER_SPLIT=per_split, F32_DOT=_is_interpreted(), HAS_MAP=expert_map is not None,
        SPLIT_GATED=split_gated, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split_gated:
        _split_act(dst, out, topk_ids, expert_map, n, pairs, num_experts, split, act)


ExpertsAndMap = tuple["GPTQExperts | FP8Experts", "torch.Tensor | None"]  # stacked experts, global -> local map


def _num_experts(w: GPTQExperts | FP8Experts) -> int:
    return w.qweight.shape[0] if isinstance(w, GPTQExperts) else w.weight.shape[0]


def _config_format(w: GPTQExperts | FP8Experts) -> str:
    if isinstance(w, GPTQExperts):
        return f"int{w.bits}"
    return "fp8_block" if w.block_size is not None else "fp8_channel"


def _check_moe(x, gate_up: Sequence[ExpertsAndMap], down: Sequence[ExpertsAndMap], topk_weights, topk_ids, activation
               ) -> tuple[int, int, int]:  # fmt: skip
    if activation not in ACTIVATIONS:
        raise EnhancedError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}",
                            culprit="activation")  # fmt: skip
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise EnhancedError(f"x must be 2-D fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}", culprit="x")
    if not gate_up or not down:
        raise EnhancedError("at least one gate/up and one down expert set are needed", culprit="w13")
    h = x.shape[1]
    two_i = gate_up[0][0].out_features
    for w13, _ in gate_up:
        for w2, _ in down:
            if (w13.in_features != h or w13.out_features != two_i or two_i % 2 or w2.in_features != two_i // 2
                    or w2.out_features != h):
                raise EnhancedError(
                    f"expert shapes do not fit hidden size {h}: w13 [{w13.in_features} -> {w13.out_features}], "
                    f"w2 [{w2.in_features} -> {w2.out_features}]",
                    culprit="w13",
                )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise EnhancedError(
            f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} do not match "
            f"{x.shape[0]} tokens",
            culprit="topk_ids",
        )
    maps = [m for _, m in (*gate_up, *down) if m is not None]
    if maps and any(m.dim() != 1 or m.shape != maps[0].shape or m.dtype != torch.int32 for m in maps):
        raise EnhancedError("expert maps must be int32 [num_experts], one length for every set", culprit="expert_map")
    if not maps and (len(gate_up) > 1 or len(down) > 1):
        raise EnhancedError("several expert sets need an expert map each", culprit="expert_map")
    if not x.is_cuda and not _is_interpreted():
        raise EnhancedError("the fused MoE kernels need CUDA tensors or TRITON_INTERPRET=1 set before import",
                            culprit="x")  # fmt: skip
    num_experts = maps[0].numel() if maps else _num_experts(gate_up[0][0])
    return num_experts, h, two_i // 2


_SIDE_STREAMS: dict[int, list[torch.cuda.Stream]] = {}


def _run_side_by_side(launches: Sequence[Callable[[], None]], device: torch.device) -> None:
    """Run the launches of one projection's sets concurrently, all done when this returns (stream-ordered).

    The first runs on the current stream, each other on a side stream of its own that waits for
    the current stream first and that the current stream then waits for: a few pairs of another
    format run beside the main set's instead of after them. Inside CUDA-graph capture the side
    streams become parallel branches of the graph. On the CPU (the interpreter) they run in turn.
    """
    if len(launches) == 1 or device.type != "cuda":
        for launch in launches:
            launch()
        return
    main = torch.cuda.current_stream(device)
    cached = _SIDE_STREAMS.setdefault(device.index or 0, [])
    while len(cached) < len(launches) - 1:
        cached.append(torch.cuda.Stream(device))
    side = cached[: len(launches) - 1]
    for stream in side:
        stream.wait_stream(main)
    launches[0]()
    for stream, launch in zip(side, launches[1:], strict=True):
        with torch.cuda.stream(stream):
            launch()
    for stream in side:
        main.wait_stream(stream)


def fused_moe_sets(
    x: torch.Tensor,
    gate_up: Sequence[ExpertsAndMap],
    down: Sequence[ExpertsAndMap],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    out: torch.Tensor | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Fused MoE over experts held in several stacked sets (one per format): one launch per set and projection,
    the sets of one projection side by side (:func:`_run_side_by_side`).

    Each set is ``(experts, expert_map)``: ``expert_map`` int32 ``[E]`` gives a global expert's
    index in the set or -1 where the set does not hold it (None: the set holds every expert, in
    order). The kernels map ``topk_ids`` themselves and skip the pairs of other sets; the
    expert-blocked path aligns the global ids once for all sets. All gate/up launches write one
    pair-indexed intermediate, then all down launches add into one float32 accumulator; pairs
    held by no set (ids outside ``[0, E)``) contribute nothing. No host synchronisation.
    ``config`` overrides the tuned choice for every set.
    """
    e_all, h, inter = _check_moe(x, gate_up, down, topk_weights, topk_ids, activation)
    t, top_k = topk_ids.shape
    result = out if out is not None else torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t == 0:
        return result
    act = ACTIVATIONS[activation]
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    acc = torch.empty((t, h), dtype=torch.float32, device=x.device)  # cleared by the first gate/up launch
    mid = torch.empty((t * top_k, inter), dtype=x.dtype, device=x.device)
    aligned: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for gated, sets in ((True, gate_up), (False, down)):
        n, k = (inter, h) if gated else (h, inter)
        a, dest = (x, mid) if gated else (mid, acc)
        launches = []
        for i, (w, expert_map) in enumerate(sets):
            zero = acc if gated and i == 0 else acc[:0]
            cfg = config or pick_moe_config(_config_format(w), e_all, h, inter, top_k, t, x.device)  # layer's shape
            tile = cfg.up if gated else cfg.down
            if cfg.path == "gemv":
                launches.append(partial(_launch_gemv, a, dest, zero, topk_ids, topk_weights, w, expert_map, n, k,
                                        e_all, top_k, tile, gated, act))  # fmt: skip
                continue
            if cfg.block_m not in aligned:  # one alignment of the global ids serves every set
                aligned[cfg.block_m] = moe_align_block_size(topk_ids, cfg.block_m, e_all)
            if cfg.path == "grouped":
                launches.append(partial(_launch_gemv, a, dest, zero, topk_ids, topk_weights, w, expert_map, n, k,
                                        e_all, top_k, tile, gated, act, aligned[cfg.block_m], cfg.block_m))  # fmt: skip
            else:
                launches.append(partial(_launch_gemm, a, dest, zero, aligned[cfg.block_m], topk_ids, topk_weights,
                                        w, expert_map, n, k, e_all, top_k, cfg.block_m, tile, gated, act))  # fmt: skip
        _run_side_by_side(launches, x.device)
    result.copy_(acc)
    return result


def fused_moe_gptq(
    x: torch.Tensor,
    w13: GPTQExperts,
    w2: GPTQExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    out: torch.Tensor | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t]))`` with ``e = topk_ids[t, j]``.

    ``w13``: gate then up stacked along the output dim (``[E, H*bits/32, 2I]``); ``w2``: ``[E, I*bits/32, H]``.
    Pairs routed to experts outside ``[0, E)`` contribute nothing. ``config`` overrides the tuned choice.
    """
    return fused_moe_sets(x, [(w13, None)], [(w2, None)], topk_weights, topk_ids, activation=activation, out=out,
                          config=config)


def fused_moe_fp8(
    x: torch.Tensor,
    w13: FP8Experts,
    w2: FP8Experts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    out: torch.Tensor | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """:func:`fused_moe_gptq` for FP8 e4m3 experts (``w13 [E, 2I, H]``, ``w2 [E, H, I]``)."""
    return fused_moe_sets(x, [(w13, None)], [(w2, None)], topk_weights, topk_ids, activation=activation, out=out,
                          config=config)


def _expert_weights_f64(w: GPTQExperts | FP8Experts) -> torch.Tensor:
    """All experts dequantized in float64, nn.Linear layout ``[E, N, K]``."""
    if isinstance(w, FP8Experts):
        if w.block_size is None:
            return w.weight.double() * w.scale.double()[..., None]
        return fp8_block_dequant_ref(w.weight, w.scale, w.block_size, torch.float64)
    kw = dict(bits=w.bits, group_size=w.group_size, zero_offset=w.zero_offset, out_dtype=torch.float64)
    if w.perm is not None:  # rows sorted at load: decode in stored order, then put them back
        return unsort_rows(gptq_dequant_ref(w.qweight, w.qzeros, w.scales, None, **kw), w)
    if w.g_idx is not None and w.g_idx.dim() == 3:  # gate and up with their own g_idx
        n = w.out_features // 2
        gate = gptq_dequant_ref(w.qweight, w.qzeros, w.scales, w.g_idx[:, 0], **kw)[:, :n]
        up = gptq_dequant_ref(w.qweight, w.qzeros, w.scales, w.g_idx[:, 1], **kw)[:, n:]
        return torch.cat([gate, up], dim=1)
    return gptq_dequant_ref(w.qweight, w.qzeros, w.scales, w.g_idx, **kw)


def fused_moe_ref(
    x: torch.Tensor,
    w13: GPTQExperts | FP8Experts,
    w2: GPTQExperts | FP8Experts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
) -> torch.Tensor:
    """Float64 reference of :func:`fused_moe_gptq` / :func:`fused_moe_fp8` (on the inputs' device)."""
    w13_f = _expert_weights_f64(w13)
    w2_f = _expert_weights_f64(w2)
    e, two_i = w13_f.shape[:2]
    xf = x.double()
    out = torch.zeros(x.shape[0], w2_f.shape[1], dtype=torch.float64, device=x.device)
    for j in range(topk_ids.shape[1]):
        ids = topk_ids[:, j].long()
        valid = (ids >= 0) & (ids < e)
        rows = torch.nonzero(valid).flatten()
        if rows.numel() == 0:
            continue
        ex = ids[rows]
        gu = torch.einsum("tk,tnk->tn", xf[rows], w13_f[ex])
        g, u = gu[:, : two_i // 2], gu[:, two_i // 2 :]
        a = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g)
        y = torch.einsum("tk,tnk->tn", a * u, w2_f[ex])
        out[rows] += topk_weights[rows, j].double()[:, None] * y
    return out


fused_moe_gptq_ref = fused_moe_ref
fused_moe_fp8_ref = fused_moe_ref
