"""Triton GPTQ dequantization: packed int32 ``qweight`` -> float weight ``[out, in]``.

One program writes a ``[BLOCK_N, BLOCK_K]`` tile of the output (``BLOCK_N`` output
channels x ``BLOCK_K`` input rows) of one matrix; a third grid axis walks stacked matrices
(all experts of a layer). For 2/4/8 bits each packed word is loaded once and split into its
``32/bits`` values in registers, so a thread stores them as one contiguous vector; 3-bit
values (which straddle words) are gathered value by value. With act-order (``g_idx``) the
scale and zero rows of each input row are gathered along the output channels and transposed
in registers to the tile.

``w[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + zero_offset))`` with ``g`` the
group of input row ``i`` (``g_idx[i]``, else ``i // group_size``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.kernels.reference import gptq_dequant_ref

# Tile configs (BLOCK_N, BLOCK_K, num_warps) from largest to smallest; a launch takes the first
# that gives at least MIN_PROGRAMS_PER_SM programs per SM (benchmarks/NOTES_dequant.md).
TILE_LADDER = ((64, 128, 4), (32, 64, 4))
BATCHED_CONFIG = (128, 128, 8)  # many stacked matrices: fewer, larger programs
ACT_ORDER_CONFIG = (128, 32, 4)  # with the row-split kernel (2/4/8 bits)
ACT_ORDER_CONFIG_3BIT = (64, 64, 4)  # with the [in, out]-oriented tile
# Kernel variants: words split in registers ([out, in] tile), values gathered one by one
# ([out, in] tile), the [in, out]-oriented tile (scale rows gathered whole; fastest for 3-bit
# act-order), or words split in registers with scale and zero rows gathered along the output
# channels (fastest for 2/4/8-bit act-order); see benchmarks/NOTES_dequant.md.
SPLIT, GATHER, KMAJOR, ROWSPLIT = 0, 1, 2, 3
MIN_PROGRAMS_PER_SM = 4
INTERPRETER_CONFIG = (64, 128, 4)


@functools.lru_cache(maxsize=1024)
def pick_config(
    bits: int, e: int, n: int, k: int, device: torch.device, act_order: bool = False
) -> tuple[int, int, int]:
    """Tile config for ``e`` matrices of ``[n, k]``: large tiles when there is enough work."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if act_order:
        return ACT_ORDER_CONFIG_3BIT if bits == 3 else ACT_ORDER_CONFIG
    sms = _sm_count(device)

    def programs(cfg: tuple[int, int, int]) -> int:
        return e * triton.cdiv(n, cfg[0]) * triton.cdiv(k, cfg[1])

    if programs(BATCHED_CONFIG) >= 16 * sms:
        return BATCHED_CONFIG
    for cfg in TILE_LADDER:
        if programs(cfg) >= MIN_PROGRAMS_PER_SM * sms:
            return cfg
    return TILE_LADDER[-1]


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@triton.jit
def _split_words(p, BN: tl.constexpr, BR: tl.constexpr, BITS: tl.constexpr):
    """[BN, BR] int32 words -> [BN, BR * 32 // BITS] values, value t of word r at column r*V+t."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        v0 = p & MASK
        v1 = (p >> 8) & MASK
        v2 = (p >> 16) & MASK
        v3 = (p >> 24) & MASK
        x = tl.join(tl.join(v0, v2), tl.join(v1, v3))
        return tl.reshape(x, (BN, BR * 4))
    elif BITS == 4:
        v0 = p & MASK
        v1 = (p >> 4) & MASK
        v2 = (p >> 8) & MASK
        v3 = (p >> 12) & MASK
        v4 = (p >> 16) & MASK
        v5 = (p >> 20) & MASK
        v6 = (p >> 24) & MASK
        v7 = (p >> 28) & MASK
        a = tl.join(tl.join(v0, v4), tl.join(v2, v6))
        b = tl.join(tl.join(v1, v5), tl.join(v3, v7))
        return tl.reshape(tl.join(a, b), (BN, BR * 8))
    else:
        v0 = p & MASK
        v1 = (p >> 2) & MASK
        v2 = (p >> 4) & MASK
        v3 = (p >> 6) & MASK
        v4 = (p >> 8) & MASK
        v5 = (p >> 10) & MASK
        v6 = (p >> 12) & MASK
        v7 = (p >> 14) & MASK
        v8 = (p >> 16) & MASK
        v9 = (p >> 18) & MASK
        v10 = (p >> 20) & MASK
        v11 = (p >> 22) & MASK
        v12 = (p >> 24) & MASK
        v13 = (p >> 26) & MASK
        v14 = (p >> 28) & MASK
        v15 = (p >> 30) & MASK
        a0 = tl.join(tl.join(v0, v8), tl.join(v4, v12))
        a1 = tl.join(tl.join(v2, v10), tl.join(v6, v14))
        b0 = tl.join(tl.join(v1, v9), tl.join(v5, v13))
        b1 = tl.join(tl.join(v3, v11), tl.join(v7, v15))
        return tl.reshape(tl.join(tl.join(a0, a1), tl.join(b0, b1)), (BN, BR * 16))


@triton.jit
def _gather_values(base_ptr, idx, stride, mask, BITS: tl.constexpr):
    """Value ``idx`` of the bit stream ``base_ptr[w * stride]`` (any shape of ``idx``)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    bit = idx * BITS
    word = bit // 32
    shift = bit % 32
    lo = tl.load(base_ptr + word * stride, mask=mask, other=0)
    v = (lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)).to(tl.int32, bitcast=True)
    if 32 % BITS != 0:  # a value may continue in the next word
        spill = shift > 32 - BITS
        hi = tl.load(base_ptr + (word + 1) * stride, mask=mask & spill, other=0)
        up = tl.where(spill, 32 - shift, 0).to(tl.uint32)
        v = v | tl.where(spill, (hi.to(tl.uint32, bitcast=True) << up).to(tl.int32, bitcast=True), 0)
    return v & MASK


@triton.jit
def _gptq_dequant_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    K,
    N,
    group_size,
    zero_offset,
    sq_e,
    sq_r,
    sq_n,
    sz_e,
    sz_g,
    sz_c,
    ss_e,
    ss_g,
    ss_n,
    sg_e,
    sg_k,
    so_e,
    so_n,
    so_k,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    GS: tl.constexpr,
    STREAM_OUT: tl.constexpr,
    GATHER_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = pid % k_tiles
    pid_n = pid // k_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    qw = qweight_ptr + e * sq_e
    qz = qzeros_ptr + e * sz_e
    sc = scales_ptr + e * ss_e

    # Quantized values q[n, k].
    if 32 % BITS == 0 and not GATHER_Q:
        VPW: tl.constexpr = 32 // BITS
        BLOCK_R: tl.constexpr = BLOCK_K // VPW
        offs_r = pid_k * BLOCK_R + tl.arange(0, BLOCK_R)
        words = tl.load(
            qw + offs_r[None, :] * sq_r + offs_n[:, None] * sq_n,
            mask=mask_n[:, None] & (offs_r < K // VPW)[None, :],
            other=0,
        )
        q = _split_words(words, BLOCK_N, BLOCK_R, BITS)
    else:
        q = _gather_values(qw + offs_n[:, None] * sq_n, offs_k[None, :], sq_r, mask, BITS)

    # Zeros and scales of each element's group.
    if GROUP_MODE == 1:  # the tile lies inside one group
        g = (pid_k * BLOCK_K) // group_size
        z = _gather_values(qz + g * sz_g, offs_n, sz_c, mask_n, BITS)[:, None]
        s = tl.load(sc + g * ss_g + offs_n * ss_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    elif GROUP_MODE == 2:  # the tile covers BLOCK_K // GS whole groups
        GPT: tl.constexpr = BLOCK_K // GS
        offs_g = (pid_k * BLOCK_K) // GS + tl.arange(0, GPT)
        mask_g = mask_n[:, None] & (offs_g * GS < K)[None, :]
        z = _gather_values(qz + offs_g[None, :] * sz_g, offs_n[:, None], sz_c, mask_g, BITS)
        s = tl.load(sc + offs_g[None, :] * ss_g + offs_n[:, None] * ss_n, mask=mask_g, other=0.0)
        z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, GS)), (BLOCK_N, BLOCK_K))
        s = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, GPT, GS)), (BLOCK_N, BLOCK_K))
    else:
        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + e * sg_e + offs_k * sg_k, mask=mask_k, other=0)
        else:
            g = offs_k // group_size
        z = _gather_values(qz + g[None, :] * sz_g, offs_n[:, None], sz_c, mask, BITS)
        s = tl.load(sc + g[None, :] * ss_g + offs_n[:, None] * ss_n, mask=mask, other=0.0).to(tl.float32)

    w = (q - z - zero_offset).to(tl.float32) * s
    out_ptrs = out_ptr + e * so_e + offs_n[:, None] * so_n + offs_k[None, :] * so_k
    if STREAM_OUT:
        tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")
    else:
        tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gptq_dequant_kmajor_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    K,
    N,
    group_size,
    zero_offset,
    sq_e,
    sq_r,
    sq_n,
    sz_e,
    sz_g,
    sz_c,
    ss_e,
    ss_g,
    ss_n,
    sg_e,
    sg_k,
    so_e,
    so_n,
    so_k,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    STREAM_OUT: tl.constexpr,
):
    """Same result as ``_gptq_dequant_kernel`` from a ``[BLOCK_K, BLOCK_N]`` tile whose loads all
    run along the output channels (rows of scales gathered by ``g_idx`` stay contiguous);
    only the finished tile is transposed on its way to the ``[out, in]`` store."""
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = pid % k_tiles
    pid_n = pid // k_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + e * sg_e + offs_k * sg_k, mask=mask_k, other=0)
    else:
        g = offs_k // group_size
    q = _gather_values(qweight_ptr + e * sq_e + offs_n[None, :] * sq_n, offs_k[:, None], sq_r, mask, BITS)
    z = _gather_values(qzeros_ptr + e * sz_e + g[:, None] * sz_g, offs_n[None, :], sz_c, mask, BITS)
    s = tl.load(scales_ptr + e * ss_e + g[:, None] * ss_g + offs_n[None, :] * ss_n, mask=mask, other=0.0)
    w = ((q - z - zero_offset).to(tl.float32) * s.to(tl.float32)).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + e * so_e + offs_n[None, :] * so_n + offs_k[:, None] * so_k
    if STREAM_OUT:
        tl.store(out_ptrs, w, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(out_ptrs, w, mask=mask)


@triton.jit
def _gptq_dequant_rowsplit_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    K,
    N,
    group_size,
    zero_offset,
    sq_e,
    sq_r,
    sq_n,
    sz_e,
    sz_g,
    sz_c,
    ss_e,
    ss_g,
    ss_n,
    sg_e,
    sg_k,
    so_e,
    so_n,
    so_k,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    STREAM_OUT: tl.constexpr,
):
    """2/4/8 bits: packed words, gathered scale rows and gathered zero words are each loaded once,
    along the output channels; words are split into their input rows, zero words into their
    channels, in registers; scales and zeros are transposed to the ``[BLOCK_N, BLOCK_K]`` tile."""
    VPW: tl.constexpr = 32 // BITS
    BLOCK_R: tl.constexpr = BLOCK_K // VPW
    BLOCK_C: tl.constexpr = BLOCK_N // VPW
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = pid % k_tiles
    pid_n = pid // k_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_k * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_k = offs_k < K
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + e * sg_e + offs_k * sg_k, mask=mask_k, other=0, eviction_policy="evict_last")
    else:
        g = offs_k // group_size
    zw = tl.load(
        qzeros_ptr + e * sz_e + g[:, None] * sz_g + offs_c[None, :] * sz_c,
        mask=mask_k[:, None] & (offs_c < N // VPW)[None, :],
        other=0,
        eviction_policy="evict_last",
    )
    z = _split_words(zw, BLOCK_K, BLOCK_C, BITS) + zero_offset  # [BLOCK_K, BLOCK_N]
    s = tl.load(
        scales_ptr + e * ss_e + g[:, None] * ss_g + offs_n[None, :] * ss_n,
        mask=mask_k[:, None] & mask_n[None, :],
        other=0.0,
        eviction_policy="evict_last",
    )
    words = tl.load(
        qweight_ptr + e * sq_e + offs_r[:, None] * sq_r + offs_n[None, :] * sq_n,
        mask=(offs_r < K // VPW)[:, None] & mask_n[None, :],
        other=0,
    )
    q = _split_words(tl.trans(words), BLOCK_N, BLOCK_R, BITS)  # [BLOCK_N, BLOCK_K]
    zt = tl.trans(z.to(tl.int16)).to(tl.int32)  # zeros + offset fit 16 bits
    w = ((q - zt).to(tl.float32) * tl.trans(s).to(tl.float32)).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + e * so_e + offs_n[:, None] * so_n + offs_k[None, :] * so_k
    mask = mask_n[:, None] & mask_k[None, :]
    if STREAM_OUT:
        tl.store(out_ptrs, w, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(out_ptrs, w, mask=mask)


def _is_interpreted() -> bool:
    return type(_gptq_dequant_kernel).__name__ == "InterpretedFunction"


def _check(qweight, qzeros, scales, g_idx, bits, group_size, batched) -> tuple[int, int, int]:
    nd = 3 if batched else 2
    if qweight.dim() != nd or qzeros.dim() != nd or scales.dim() != nd:
        raise EnhancedError(
            f"expected {nd}-D qweight/qzeros/scales, got {tuple(qweight.shape)}, {tuple(qzeros.shape)}, "
            f"{tuple(scales.shape)}",
            culprit="qweight",
        )
    if bits not in (2, 3, 4, 8):
        raise EnhancedError(f"unsupported bits {bits}", culprit="bits")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise EnhancedError("qweight and qzeros must be int32", culprit="qweight")
    rows, n = qweight.shape[-2:]
    k = rows * 32 // bits
    if rows * 32 % bits or (bits == 3 and rows % 3):
        raise EnhancedError(f"qweight rows {rows} do not hold whole {bits}-bit blocks", culprit="qweight")
    groups = scales.shape[-2]
    if scales.shape[-1] != n or qzeros.shape[-2] != groups or qzeros.shape[-1] * 32 != n * bits:
        raise EnhancedError(
            f"inconsistent shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}",
            culprit="qzeros",
        )
    if g_idx is not None and tuple(g_idx.shape) != tuple(qweight.shape[:-2]) + (k,):
        raise EnhancedError(
            f"g_idx shape {tuple(g_idx.shape)} does not match in_features {k}", culprit="g_idx"
        )
    if g_idx is None and group_size != -1 and (group_size <= 0 or -(-k // group_size) != groups):
        raise EnhancedError(
            f"group_size {group_size} gives {-(-k // max(group_size, 1))} groups, scales have {groups}",
            culprit="group_size",
        )
    if g_idx is None and group_size == -1 and groups != 1:
        raise EnhancedError(f"group_size -1 needs one group, scales have {groups}", culprit="group_size")
    e = qweight.shape[0] if batched else 1
    return e, n, k


def _launch(qweight, qzeros, scales, g_idx, out, bits, group_size, zero_offset, config, batched) -> None:
    e, n, k = out.shape[0] if batched else 1, out.shape[-2], out.shape[-1]
    block_n, block_k, num_warps, *rest = config or pick_config(bits, e, n, k, out.device, g_idx is not None)
    # Streaming (evict-first) stores help when the output is far larger than L2.
    stream = bool(rest[0]) if rest else e * n * k * out.element_size() > 2**28
    if len(rest) > 1:
        variant = int(rest[1])
    else:
        variant = SPLIT if g_idx is None else KMAJOR if bits == 3 else ROWSPLIT
    if variant == ROWSPLIT and bits == 3:
        raise EnhancedError("the row-split kernel needs 2, 4 or 8 bits", culprit="config")
    gs = k if group_size == -1 or group_size >= k else group_size
    if g_idx is not None:
        mode = 0
    elif gs % block_k == 0 or gs >= k:
        mode = 1
    elif block_k % gs == 0 and gs & (gs - 1) == 0:
        mode = 2
    else:
        mode = 0
    if not batched:
        qweight, qzeros, scales, out = (t.unsqueeze(0) for t in (qweight, qzeros, scales, out))
        g_idx = g_idx.unsqueeze(0) if g_idx is not None else None
    if g_idx is not None and g_idx.dtype not in (torch.int32, torch.int64):
        g_idx = g_idx.to(torch.int32)
    g_arg = g_idx if g_idx is not None else qweight  # unused pointer when there is no g_idx
    g_strides = (g_idx.stride(0), g_idx.stride(1)) if g_idx is not None else (0, 0)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(k, block_k), e)
    if variant == ROWSPLIT:
        _gptq_dequant_rowsplit_kernel[grid](
            qweight, qzeros, scales, g_arg, out,
            k, n, gs, zero_offset,
            *qweight.stride(), *qzeros.stride(), *scales.stride(), *g_strides, *out.stride(),
            BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, HAS_G_IDX=g_idx is not None, STREAM_OUT=stream,
            num_warps=num_warps,
        )  # fmt: skip
        return
    if variant == KMAJOR:
        _gptq_dequant_kmajor_kernel[grid](
            qweight, qzeros, scales, g_arg, out,
            k, n, gs, zero_offset,
            *qweight.stride(), *qzeros.stride(), *scales.stride(), *g_strides, *out.stride(),
            BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, HAS_G_IDX=g_idx is not None, STREAM_OUT=stream,
            num_warps=num_warps,
        )  # fmt: skip
        return
    _gptq_dequant_kernel[grid](
        qweight, qzeros, scales, g_arg, out,
        k, n, gs, zero_offset,
        *qweight.stride(), *qzeros.stride(), *scales.stride(), *g_strides, *out.stride(),
        BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_G_IDX=g_idx is not None, GROUP_MODE=mode, GS=gs if mode == 2 else 1, STREAM_OUT=stream,
        GATHER_Q=variant == GATHER,
        num_warps=num_warps,
    )  # fmt: skip


def _dispatch(qweight, qzeros, scales, g_idx, bits, group_size, zero_offset, out_dtype, out, use_triton, config,
              batched) -> torch.Tensor:  # fmt: skip
    e, n, k = _check(qweight, qzeros, scales, g_idx, bits, group_size, batched)
    shape = (e, n, k) if batched else (n, k)
    if out is not None and (tuple(out.shape) != shape or out.device != qweight.device):
        raise EnhancedError(f"out must be {shape} on {qweight.device}, got {tuple(out.shape)}", culprit="out")
    if use_triton is None:
        use_triton = qweight.is_cuda
    if not use_triton:
        ref = gptq_dequant_ref(qweight, qzeros, scales, g_idx, bits=bits, group_size=group_size,
                               zero_offset=zero_offset, out_dtype=out.dtype if out is not None else out_dtype)  # fmt: skip
        if out is None:
            return ref
        out.copy_(ref)
        return out
    if not qweight.is_cuda and not _is_interpreted():
        raise EnhancedError("the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1 set before import",
                            culprit="use_triton")  # fmt: skip
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=qweight.device)
    if out.numel():
        _launch(qweight, qzeros, scales, g_idx, out, bits, group_size, zero_offset, config, batched)
    return out


def gptq_dequant(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    zero_offset: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Dequantize one GPTQ matrix to ``[out_features, in_features]``.

    ``zero_offset`` is 1 for checkpoint format ``gptq`` (v1) and 0 for ``gptq_v2``;
    ``group_size`` -1 means one group; ``g_idx`` (act-order) overrides ``group_size``.
    ``out`` may be a strided view to write into (e.g. a slice of a fused parameter).
    ``use_triton``: None picks Triton for CUDA tensors and the torch reference otherwise;
    True on CPU needs ``TRITON_INTERPRET=1``.
    ``config`` = (BLOCK_N, BLOCK_K, num_warps[, stream[, variant]]) overrides :func:`pick_config`.
    """
    return _dispatch(qweight, qzeros, scales, g_idx, bits, group_size, zero_offset, out_dtype, out, use_triton,
                     config, batched=False)  # fmt: skip


def gptq_dequant_batched(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    zero_offset: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Dequantize ``E`` stacked same-shape GPTQ matrices in one launch: ``[E, out, in]``.

    Inputs carry a leading expert dim: qweight ``[E, in*bits/32, out]``, qzeros
    ``[E, groups, out*bits/32]``, scales ``[E, groups, out]``, g_idx ``[E, in]``.
    """
    return _dispatch(qweight, qzeros, scales, g_idx, bits, group_size, zero_offset, out_dtype, out, use_triton,
                     config, batched=True)  # fmt: skip
