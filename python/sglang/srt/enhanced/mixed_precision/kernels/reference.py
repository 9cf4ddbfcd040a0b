"""Torch references for the dequantization kernels (same signatures as the launchers).

They compute in float32 (float64 when ``out_dtype`` is float64), are vectorised, and
serve as the CPU path of the decoders.
"""

from __future__ import annotations

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.packing import unpack_int32


def _compute_dtype(out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def gptq_group_index(
    in_features: int, g_idx: torch.Tensor | None, group_size: int, device: torch.device
) -> torch.Tensor:
    """Group of every input row: ``g_idx`` if given, else ``row // group_size`` (-1: one group)."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    rows = torch.arange(in_features, device=device)
    if group_size == -1:
        return torch.zeros_like(rows)
    return rows // group_size


def gptq_dequant_ref(
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
    """GPTQ weight in nn.Linear layout ``[out, in]``.

    ``w[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + zero_offset))`` with ``g`` the group of
    input row ``i``; ``q`` unpacked from ``qweight`` along dim 0, ``z`` from ``qzeros`` along
    dim 1. Leading batch dims (stacked experts) are allowed on all inputs.
    """
    if group_size == 0 or group_size < -1:
        raise EnhancedError(f"group_size must be positive or -1, got {group_size}", culprit="group_size")
    ct = _compute_dtype(out_dtype)
    q = unpack_int32(qweight, bits, dim=-2)  # [..., in, out]
    z = unpack_int32(qzeros, bits, dim=-1)  # [..., groups, out]
    groups = gptq_group_index(q.shape[-2], g_idx, group_size, q.device)  # [in] or [..., in]
    if groups.dim() > 1:
        idx = groups.unsqueeze(-1).expand(*groups.shape, q.shape[-1])
        zg = torch.gather(z, -2, idx)
        sg = torch.gather(scales.to(ct), -2, idx)
    else:
        zg = z.index_select(-2, groups)
        sg = scales.to(ct).index_select(-2, groups)
    w = (q - zg - zero_offset).to(ct) * sg
    return w.transpose(-1, -2).to(out_dtype).contiguous()


def fp8_block_dequant_ref(
    weight_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``w[o, i] = weight_fp8[o, i] * scale_inv[o // bo, i // bi]``; edge blocks may be partial."""
    bo, bi = block_size
    out_f, in_f = weight_fp8.shape[-2:]
    ct = _compute_dtype(out_dtype)
    s = scale_inv.to(ct)
    s = s.repeat_interleave(bo, dim=-2)[..., :out_f, :].repeat_interleave(bi, dim=-1)[..., :in_f]
    return (weight_fp8.to(ct) * s).to(out_dtype)


def fp8_scaled_dequant_ref(
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Per-tensor (scalar / ``[1]``) or per-channel (``[out]`` / ``[out, 1]``) scaled FP8."""
    ct = _compute_dtype(out_dtype)
    s = weight_scale.to(ct)
    if s.numel() == 1:
        s = s.reshape(())
    else:
        s = s.reshape(-1, 1)
    return (weight_fp8.to(ct) * s).to(out_dtype)
