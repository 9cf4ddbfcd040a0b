"""Pack small unsigned integers into int32 words in the GPTQ layout, and back.

GPTQ checkpoints (AutoGPTQ / GPTQModel) store ``qweight`` as int32 ``[in*bits/32, out]``
packed along dim 0 and ``qzeros`` as int32 ``[groups, out*bits/32]`` packed along dim 1.
Along the packed dim the values form one little-endian bit stream: value ``j`` occupies
stream bits ``[j*bits, (j+1)*bits)``, and word ``w`` holds stream bits ``[32*w, 32*w+32)``.
For 2, 4 and 8 bits every word holds ``32/bits`` whole values (value ``k`` of a word at bits
``[k*bits, (k+1)*bits)``); for 3 bits 32 values fill 3 words and some values straddle two
words, exactly as GPTQ's 3-bit layout does.
"""

from __future__ import annotations

import math

import torch

from sglang.srt.enhanced.errors import EnhancedError

SUPPORTED_BITS = (2, 3, 4, 8)


def block_shape(bits: int) -> tuple[int, int]:
    """``(values, words)`` of the smallest block that packs into whole int32 words."""
    check_bits(bits)
    values = math.lcm(32, bits) // bits
    return values, values * bits // 32


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise EnhancedError(
            f"unsupported bit width {bits}; supported: {list(SUPPORTED_BITS)}", culprit="bits"
        )


def _norm_dim(t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0:
        raise EnhancedError("cannot pack or unpack a 0-d tensor", culprit="dim")
    if not -t.dim() <= dim < t.dim():
        raise EnhancedError(f"dim {dim} out of range for a {t.dim()}-d tensor", culprit="dim")
    return dim % t.dim()


def _bit_positions(bits: int) -> list[tuple[int, int, int]]:
    """For every value ``j`` of a block: ``(j, word, shift)`` of its lowest bit."""
    values, _ = block_shape(bits)
    return [(j, (j * bits) // 32, (j * bits) % 32) for j in range(values)]


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``values`` (integers in ``[0, 2**bits)``) along ``dim`` into int32 words.

    Pseudocode, per block of ``V`` consecutive values along ``dim`` (``V = lcm(32,bits)/bits``)::

        stream = 0
        for j in range(V):
            stream |= values[j] << (j * bits)
        words[w] = (stream >> (32 * w)) & 0xFFFFFFFF   # reinterpreted as int32

    The size of ``dim`` must be a multiple of ``V`` (8 for 4 bits, 32 for 3 bits).
    Returns int32 with ``dim`` shrunk by ``32/bits``; other dims unchanged.
    """
    values_per_block, words_per_block = block_shape(bits)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise EnhancedError(f"pack_int32 needs an integer tensor, got {values.dtype}", culprit="values")
    dim = _norm_dim(values, dim)
    n = values.shape[dim]
    if n % values_per_block:
        raise EnhancedError(
            f"size {n} of dim {dim} is not a multiple of {values_per_block} ({bits}-bit packing)",
            culprit="values",
        )
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise EnhancedError(
            f"values out of range for {bits} bits: min {int(v.min())}, max {int(v.max())}, "
            f"allowed [0, {(1 << bits) - 1}]",
            culprit="values",
        )
    v = v.movedim(dim, -1)
    lead = v.shape[:-1]
    v = v.reshape(*lead, n // values_per_block, values_per_block)
    words = torch.zeros(*lead, n // values_per_block, words_per_block, dtype=torch.int64, device=v.device)
    for j, w, s in _bit_positions(bits):
        words[..., w] |= (v[..., j] << s) & 0xFFFFFFFF
        if s + bits > 32:  # the value straddles into the next word
            words[..., w + 1] |= v[..., j] >> (32 - s)
    words = words.reshape(*lead, n // values_per_block * words_per_block)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int32 values in ``[0, 2**bits)``.

    Pseudocode, per block of ``W`` words along ``dim`` (``W = bits`` for 3 bits, else 1)::

        stream = sum(unsigned(words[w]) << (32 * w) for w in range(W))
        values[j] = (stream >> (j * bits)) & (2**bits - 1)

    The size of ``dim`` grows by ``32/bits``.
    """
    values_per_block, words_per_block = block_shape(bits)
    if packed.dtype != torch.int32:
        raise EnhancedError(f"unpack_int32 needs an int32 tensor, got {packed.dtype}", culprit="packed")
    dim = _norm_dim(packed, dim)
    n = packed.shape[dim]
    if n % words_per_block:
        raise EnhancedError(
            f"size {n} of dim {dim} is not a multiple of {words_per_block} ({bits}-bit packing)",
            culprit="packed",
        )
    mask = (1 << bits) - 1
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    lead = p.shape[:-1]
    blocks = n // words_per_block
    p = p.reshape(*lead, blocks, words_per_block)
    out = torch.empty(*lead, blocks, values_per_block, dtype=torch.int32, device=p.device)
    for j, w, s in _bit_positions(bits):
        v = p[..., w] >> s
        if s + bits > 32:
            v = v | (p[..., w + 1] << (32 - s))
        out[..., j] = (v & mask).to(torch.int32)
    return out.reshape(*lead, blocks * values_per_block).movedim(-1, dim).contiguous()
