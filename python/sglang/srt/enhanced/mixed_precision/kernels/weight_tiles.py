"""Triton helpers that read one ``[BLOCK_N, BLOCK_K]`` tile of a packed weight into registers.

Shared by the fused MoE and the packed linear kernels. Each returns ``(v, s)``: ``v`` float32
``[BLOCK_N, BLOCK_K]`` and ``s`` float32 ``[BLOCK_N]`` with ``W[n, k] = v[n, k] * s[n]`` over the
tile, so a caller folds the per-channel scale in once per tile (``acc += s * (x @ v)``) when the
tile lies inside one quantization group; otherwise ``s`` is one and ``v`` carries the scales.

GPTQ codes become floats without an int-to-float conversion: ``q | 0x4B000000`` read as float32
is ``2**23 + q``, and the zero (plus ``2**23``) is subtracted in the same add.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sglang.srt.enhanced.mixed_precision.kernels.gptq_dequant import _gather_values, _split_words

# Group layouts of a GPTQ tile: scales/zeros gathered per element (act-order, irregular groups),
# one group row for the whole tile, or BLOCK_K // GS whole groups side by side.
GROUP_GATHER, GROUP_ONE, GROUP_SPAN = 0, 1, 2
MAGIC_F32 = 8388608.0  # 2**23
# How a whole-tile GPTQ read takes the values out of the packed words: one bit-stream gather per
# value (any width, 3-bit), one load per word split into its values (``_split_words``), or one
# load per value of its word (repeated addresses, served by L1) shifted by the value's position.
UNPACK_GATHER, UNPACK_JOIN, UNPACK_REPEAT = 0, 1, 2
UNPACK_MODES = {"join": UNPACK_JOIN, "repeat": UNPACK_REPEAT}


def gptq_unpack_mode(bits: int, unpack: str) -> int:
    """The whole-tile unpack of ``bits``-bit words asked for by a config's ``unpack`` ("join" or
    "repeat"); widths that do not divide 32 always gather."""
    return UNPACK_MODES.get(unpack, UNPACK_JOIN) if 32 % bits == 0 else UNPACK_GATHER


def gptq_reads_planes(bits: int, unpack: str, sorted_rows: bool) -> bool:
    """Whether a GPTQ tile is read by word planes: asked for (``unpack == "planes"``), 2/4/8 bits, and
    rows in checkpoint order (rows sorted at load gather their activations, which only the whole-tile
    reads do; ``gptq_unpack_mode`` gives those reads for "planes")."""
    return unpack == "planes" and bits != 3 and not sorted_rows


def gptq_group_mode(group_size: int, k: int, block_k: int, act_order: bool) -> int:
    """How a ``block_k``-row tile meets the quantization groups (``group_size`` -1 = one group)."""
    gs = k if group_size == -1 or group_size >= k else group_size
    if act_order:
        return GROUP_GATHER
    if gs % block_k == 0 or gs >= k:
        return GROUP_ONE
    if block_k % gs == 0 and gs & (gs - 1) == 0:
        return GROUP_SPAN
    return GROUP_GATHER


def fp8_scale_uniform(block_size: tuple[int, int] | None, block_k: int) -> bool:
    """True when every ``block_k``-wide tile lies inside one scale block along K."""
    return block_size is None or block_size[1] % block_k == 0


@triton.jit
def _act_cols(perm_ptr, offs_k, sp_k, K, HAS_PERM: tl.constexpr):
    """Activation columns of packed rows ``offs_k``: ``perm[offs_k]`` for rows sorted at load, else ``offs_k``."""
    if HAS_PERM:
        return tl.load(perm_ptr + offs_k * sp_k, mask=offs_k < K, other=0)
    else:
        return offs_k


@triton.jit
def _gptq_tile(
    qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, k0, K, gs, zero_offset,
    sq_r, sq_n, sz_g, sz_c, ss_g, ss_n, sg_k,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr,
    GS: tl.constexpr, HAS_G_IDX: tl.constexpr, UNPACK: tl.constexpr,
):  # fmt: skip
    """Tile of one GPTQ matrix (pointers already at its expert): codes along K, channels ``offs_n``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if UNPACK == 2:
        VPW_R: tl.constexpr = 32 // BITS
        words_kn = tl.load(qw_ptr + (offs_k // VPW_R)[:, None] * sq_r + offs_n[None, :] * sq_n,
                           mask=mask_k[:, None] & mask_n[None, :], other=0)  # fmt: skip
        q = tl.trans((words_kn >> ((offs_k % VPW_R) * BITS)[:, None]) & ((1 << BITS) - 1))
    elif UNPACK == 1:
        VPW: tl.constexpr = 32 // BITS
        BLOCK_R: tl.constexpr = BLOCK_K // VPW
        offs_r = k0 // VPW + tl.arange(0, BLOCK_R)
        words = tl.load(
            qw_ptr + offs_r[None, :] * sq_r + offs_n[:, None] * sq_n,
            mask=mask_n[:, None] & (offs_r < K // VPW)[None, :],
            other=0,
        )
        q = _split_words(words, BLOCK_N, BLOCK_R, BITS)
    else:
        q = _gather_values(qw_ptr + offs_n[:, None] * sq_n, offs_k[None, :], sq_r,
                           mask_n[:, None] & mask_k[None, :], BITS)  # fmt: skip
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
    if GROUP_MODE == 1:
        g = k0 // gs
        in_k = mask_n & (k0 < K)  # a K split may run past the last group
        z = _gather_values(qz_ptr + g * sz_g, offs_n, sz_c, in_k, BITS)
        s = tl.load(s_ptr + g * ss_g + offs_n * ss_n, mask=in_k, other=0.0).to(tl.float32)
        v = qf - ((z + zero_offset).to(tl.float32) + 8388608.0)[:, None]
    elif GROUP_MODE == 2:
        GPT: tl.constexpr = BLOCK_K // GS
        offs_g = k0 // GS + tl.arange(0, GPT)
        mask_g = mask_n[:, None] & (offs_g * GS < K)[None, :]
        z = _gather_values(qz_ptr + offs_g[None, :] * sz_g, offs_n[:, None], sz_c, mask_g, BITS)
        sg = tl.load(s_ptr + offs_g[None, :] * ss_g + offs_n[:, None] * ss_n, mask=mask_g, other=0.0)
        zf = (z + zero_offset).to(tl.float32) + 8388608.0
        zf = tl.reshape(tl.broadcast_to(zf[:, :, None], (BLOCK_N, GPT, GS)), (BLOCK_N, BLOCK_K))
        sf = tl.reshape(tl.broadcast_to(sg.to(tl.float32)[:, :, None], (BLOCK_N, GPT, GS)), (BLOCK_N, BLOCK_K))
        v = (qf - zf) * sf
        s = tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        if HAS_G_IDX:
            g = tl.load(g_ptr + offs_k * sg_k, mask=mask_k, other=0)
        else:
            g = offs_k // gs
        mask = mask_n[:, None] & mask_k[None, :]
        z = _gather_values(qz_ptr + g[None, :] * sz_g, offs_n[:, None], sz_c, mask, BITS)
        sg = tl.load(s_ptr + g[None, :] * ss_g + offs_n[:, None] * ss_n, mask=mask, other=0.0)
        v = (qf - ((z + zero_offset).to(tl.float32) + 8388608.0)) * sg.to(tl.float32)
        s = tl.full((BLOCK_N,), 1.0, tl.float32)
    return v, s


@triton.jit
def _fp8_tile(
    w_ptr, s_ptr, offs_n, mask_n, k0, K, BO, BI, sw_n, sw_k, ss_n, ss_k,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKWISE: tl.constexpr, UNIFORM: tl.constexpr,
):  # fmt: skip
    """Tile of one FP8 matrix ``[N, K]``: block scales ``s[n // BO, k // BI]`` or per-channel ``s[n]``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    v = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k, mask=mask, other=0.0).to(tl.float32)
    if not BLOCKWISE:
        s = tl.load(s_ptr + offs_n * ss_n, mask=mask_n, other=0.0)
    elif UNIFORM:
        s = tl.load(s_ptr + (offs_n // BO) * ss_n + (k0 // BI) * ss_k, mask=mask_n & (k0 < K), other=0.0)
    else:
        sg = tl.load(s_ptr + (offs_n // BO)[:, None] * ss_n + (offs_k // BI)[None, :] * ss_k, mask=mask, other=0.0)
        v = v * sg
        s = tl.full((BLOCK_N,), 1.0, tl.float32)
    return v, s.to(tl.float32)


@triton.jit
def _weight_tile(
    w_ptr, z_ptr, s_ptr, g_ptr, offs_n, mask_n, k0, K, gs, zero_offset, BO, BI,
    sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
    FMT: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_MODE: tl.constexpr, GS: tl.constexpr, HAS_G_IDX: tl.constexpr, UNIFORM: tl.constexpr,
    BLOCKWISE: tl.constexpr, UNPACK: tl.constexpr,
):  # fmt: skip
    """GPTQ (``FMT`` 0: ``sw_k`` strides packed rows) or FP8 (``FMT`` 1: ``sw_k`` strides elements)."""
    if FMT == 0:
        return _gptq_tile(w_ptr, z_ptr, s_ptr, g_ptr, offs_n, mask_n, k0, K, gs, zero_offset,
                          sw_k, sw_n, sz_g, sz_c, ss_k, ss_n, sg_k,
                          BITS, BLOCK_N, BLOCK_K, GROUP_MODE, GS, HAS_G_IDX, UNPACK)  # fmt: skip
    else:
        return _fp8_tile(w_ptr, s_ptr, offs_n, mask_n, k0, K, BO, BI, sw_n, sw_k, ss_n, ss_k,
                         BLOCK_N, BLOCK_K, BLOCKWISE, UNIFORM)  # fmt: skip


# Word-plane GPTQ tiles (2/4/8 bits): a [BLOCK_R, BLOCK_N] tile of packed words is loaded once and
# value j of every word is taken out as one "plane" (input rows r*VPW + j), so no register
# reshuffling is needed; the activations are read at the matching rows instead. The dot product
# over a tile is the same sum in another order.
GROUP_ROWS = 3  # every packed word lies inside one group (group_size a multiple of 32/bits)


def gptq_plane_mode(group_size: int, k: int, block_k: int, bits: int, act_order: bool) -> int:
    """Group layout for the word-plane tiles: one group per tile, one per word row, or per value."""
    gs = k if group_size == -1 or group_size >= k else group_size
    if act_order:
        return GROUP_GATHER
    if gs % block_k == 0 or gs >= k:
        return GROUP_ONE
    if gs % (32 // bits) == 0:
        return GROUP_ROWS
    return GROUP_GATHER


@triton.jit
def _plane_params(qz_ptr, s_ptr, g_rows, offs_n, mask, zero_offset, sz_g, sz_c, ss_g, ss_n, BITS: tl.constexpr):
    """Zero (plus 2**23, float) and scale of groups ``g_rows [R, 1]`` x channels ``offs_n [1, N]``."""
    z = _gather_values(qz_ptr + g_rows * sz_g, offs_n, sz_c, mask, BITS)
    s = tl.load(s_ptr + g_rows * ss_g + offs_n * ss_n, mask=mask, other=0.0).to(tl.float32)
    return (z + zero_offset).to(tl.float32) + 8388608.0, s


@triton.jit
def _plane_words(qw_ptr, offs_r, mask_r, offs_n, mask_n, sq_r, sq_n):
    return tl.load(qw_ptr + offs_r[:, None] * sq_r + offs_n[None, :] * sq_n,
                   mask=mask_r[:, None] & mask_n[None, :], other=0)  # fmt: skip


@triton.jit
def _plane(words, j: tl.constexpr, BITS: tl.constexpr):
    """Value ``j`` of every word as float32 ``2**23 + q`` (no int-to-float conversion)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    return (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _plane_tile(
    qw_ptr, qz_ptr, s_ptr, offs_n, mask_n, k0, K, gs, zero_offset, sq_r, sq_n, sz_g, sz_c, ss_g, ss_n,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr,
):  # fmt: skip
    """Word rows of a tile, their masks, the packed words, and the zeros/scales that are per tile
    (GROUP_ONE, ``[1, N]``) or per word row (GROUP_ROWS, ``[R, N]``); GROUP_GATHER gets placeholders."""
    VPW: tl.constexpr = 32 // BITS
    BLOCK_R: tl.constexpr = BLOCK_K // VPW
    offs_r = k0 // VPW + tl.arange(0, BLOCK_R)
    mask_r = offs_r < K // VPW
    mask = mask_r[:, None] & mask_n[None, :]
    words = _plane_words(qw_ptr, offs_r, mask_r, offs_n, mask_n, sq_r, sq_n)
    if GROUP_MODE == 1:
        zf, s = _plane_params(qz_ptr, s_ptr, k0 // gs, offs_n[None, :], (mask_n & (k0 < K))[None, :], zero_offset,
                              sz_g, sz_c, ss_g, ss_n, BITS)  # fmt: skip
    elif GROUP_MODE == 3:
        zf, s = _plane_params(qz_ptr, s_ptr, ((offs_r * VPW) // gs)[:, None], offs_n[None, :], mask, zero_offset,
                              sz_g, sz_c, ss_g, ss_n, BITS)  # fmt: skip
    else:
        zf = tl.zeros_like(offs_n[None, :]).to(tl.float32)
        s = zf
    return offs_r, mask_r, mask, words, zf, s


@triton.jit
def _plane_gathered(
    qz_ptr, s_ptr, g_ptr, kj, mask_r, offs_n, mask, gs, zero_offset, sz_g, sz_c, ss_g, ss_n, sg_k,
    BITS: tl.constexpr, HAS_G_IDX: tl.constexpr,
):  # fmt: skip
    """Zeros/scales of input rows ``kj`` (one plane) when groups are gathered per value (act-order)."""
    if HAS_G_IDX:
        g = tl.load(g_ptr + kj * sg_k, mask=mask_r, other=0)
    else:
        g = kj // gs
    return _plane_params(qz_ptr, s_ptr, g[:, None], offs_n[None, :], mask, zero_offset, sz_g, sz_c, ss_g, ss_n, BITS)


@triton.jit
def _gptq_gemv_tile(
    acc, x_rows, mask_m, k0, K, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, gs, zero_offset,
    sq_r, sq_n, sz_g, sz_c, ss_g, ss_n, sg_k,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_G_IDX: tl.constexpr,
):  # fmt: skip
    """CUDA-core products for a few rows: ``acc [BLOCK_M, BLOCK_R, BLOCK_N] +=`` partial sums of
    ``x[rows, k0 : k0 + BLOCK_K]`` with one tile (``x_rows [BLOCK_M, 1]`` row pointers); the caller
    reduces over axis 1 at the end."""
    VPW: tl.constexpr = 32 // BITS
    offs_r, mask_r, mask, words, zf, s = _plane_tile(qw_ptr, qz_ptr, s_ptr, offs_n, mask_n, k0, K, gs, zero_offset,
                                                     sq_r, sq_n, sz_g, sz_c, ss_g, ss_n, BITS, BLOCK_K, GROUP_MODE)  # fmt: skip
    part = tl.zeros(acc.shape, tl.float32)
    for j in tl.static_range(VPW):
        kj = offs_r * VPW + j
        xj = tl.load(x_rows + kj[None, :], mask=mask_m & mask_r[None, :], other=0.0).to(tl.float32)[:, :, None]
        qf = _plane(words, j, BITS)
        if GROUP_MODE == 0:
            zg, sg = _plane_gathered(qz_ptr, s_ptr, g_ptr, kj, mask_r, offs_n, mask, gs, zero_offset,
                                     sz_g, sz_c, ss_g, ss_n, sg_k, BITS, HAS_G_IDX)  # fmt: skip
            part += ((qf - zg) * sg)[None, :, :] * xj
        else:
            part += (qf - zf)[None, :, :] * xj
    if GROUP_MODE == 0:
        return acc + part
    else:
        return acc + part * s[None, :, :]


@triton.jit
def _gptq_gemm_tile(
    acc, a_rows, mask_m, k0, K, qw_ptr, qz_ptr, s_ptr, g_ptr, offs_n, mask_n, gs, zero_offset,
    sq_r, sq_n, sz_g, sz_c, ss_g, ss_n, sg_k,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_G_IDX: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # fmt: skip
    """``acc [BLOCK_M, BLOCK_N] += A[rows, k0 : k0 + BLOCK_K] @ W_tile`` on tensor cores, one word plane at a time;
    ``a_rows [BLOCK_M, 1]`` are row pointers of A."""
    VPW: tl.constexpr = 32 // BITS
    offs_r, mask_r, mask, words, zf, s = _plane_tile(qw_ptr, qz_ptr, s_ptr, offs_n, mask_n, k0, K, gs, zero_offset,
                                                     sq_r, sq_n, sz_g, sz_c, ss_g, ss_n, BITS, BLOCK_K, GROUP_MODE)  # fmt: skip
    part = tl.zeros(acc.shape, tl.float32)
    for j in tl.static_range(VPW):
        kj = offs_r * VPW + j
        a = tl.load(a_rows + kj[None, :], mask=mask_m & mask_r[None, :], other=0.0)
        qf = _plane(words, j, BITS)
        if GROUP_MODE == 0:
            zg, sg = _plane_gathered(qz_ptr, s_ptr, g_ptr, kj, mask_r, offs_n, mask, gs, zero_offset,
                                     sz_g, sz_c, ss_g, ss_n, sg_k, BITS, HAS_G_IDX)  # fmt: skip
            b = (qf - zg) * sg
        elif GROUP_MODE == 3:
            b = (qf - zf) * s
        else:
            b = qf - zf
        if F32_DOT:  # the Triton 3.3 interpreter multiplies bfloat16 tiles wrongly
            part = tl.dot(a.to(tl.float32), b, part)
        else:
            part = tl.dot(a, b.to(a.dtype), part)
    if GROUP_MODE == 1:
        return acc + part * s
    else:
        return acc + part
