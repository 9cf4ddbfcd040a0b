"""Act-order GPTQ weights with their rows sorted by group at load time, and back.

An act-order (``desc_act``) checkpoint stores input row ``i`` in group ``g_idx[i]``, in any order,
so a kernel tile of consecutive rows meets many groups and gathers a scale and zero per value.
GPTQ assigns each group ``group_size`` rows (the last one the rest). Sorting the rows by group
makes the groups regular again::

    perm = argsort(g_idx, stable)          # per expert (and fused part)
    q_sorted[r, n] = q[perm[r], n]          # codes repacked along K
    g_idx_sorted[r] = g_idx[perm[r]] = r // group_size

so the kernels read scales per tile, as for a plain checkpoint, and gather the activations
instead: packed row ``r`` multiplies input feature ``perm[r]``. Pure torch; the sorted set takes
the memory of the original (``perm`` replaces ``g_idx``).
"""

from __future__ import annotations

import dataclasses

import torch

from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import GPTQExperts
from sglang.srt.enhanced.mixed_precision.packing import pack_int32, unpack_int32


def _sorts_to_regular_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when every group holds ``group_size`` rows (the last the rest): sorting makes them regular."""
    k = g_idx.shape[-1]
    size = k if group_size == -1 else group_size
    regular = torch.arange(k, device=g_idx.device) // size
    return bool(torch.equal(torch.sort(g_idx.to(torch.long), dim=-1).values,
                            regular.expand(g_idx.shape)))  # fmt: skip


def part_bounds(w: GPTQExperts) -> tuple[int, ...]:
    """Output boundaries of the fused parts of a per-part ``g_idx``/``perm``: ``w.bounds``, or the
    MoE kernels' convention without them (``P`` equal parts: gate, up)."""
    if w.bounds:
        return w.bounds
    parts = w.row_order.shape[-2]
    n = w.out_features
    return tuple(i * n // parts for i in range(parts + 1))


def sort_act_order(w: GPTQExperts, *, in_place: bool = False) -> GPTQExperts:
    """``w`` with its rows sorted by group and ``perm`` set; ``w`` itself when it has no ``g_idx`` or its
    groups are not ``group_size`` rows each (then the kernels gather per value, as before).

    With ``g_idx`` per fused part (``[..., P, K]``), output features ``bounds[p]:bounds[p + 1]`` are
    sorted by part ``p``'s order. Works one expert at a time, so the unpacked codes of one expert
    are the only extra memory. ``in_place``: the sorted words overwrite ``w.qweight`` and ``perm``
    overwrites ``w.g_idx`` (a loaded model's parameters keep their storage and size).
    """
    if w.g_idx is None or w.perm is not None or not _sorts_to_regular_groups(w.g_idx, w.group_size):
        return w
    perm = torch.sort(w.g_idx.to(torch.long), dim=-1, stable=True).indices.to(torch.int32)
    stacked = w.qweight.dim() == 3
    qweight = w.qweight if in_place else torch.empty_like(w.qweight)
    bounds = part_bounds(w) if w.g_idx_per_part else ()
    for e in range(w.qweight.shape[0] if stacked else 1):
        q = unpack_int32(w.qweight[e] if stacked else w.qweight, w.bits, dim=0)  # [K, N]
        p = (perm[e] if stacked else perm).to(torch.long)
        if bounds:
            q = torch.cat([q[p[i], lo:hi] for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))], dim=1)
        else:
            q = q[p]
        (qweight[e] if stacked else qweight).copy_(pack_int32(q, w.bits, dim=0))
    if in_place:
        perm = w.g_idx.copy_(perm)
    return dataclasses.replace(w, qweight=qweight, g_idx=None, perm=perm)


def unsort_rows(decoded: torch.Tensor, w: GPTQExperts) -> torch.Tensor:
    """A decoded ``[..., N, K]`` weight of sorted ``w`` back in checkpoint order (identity without ``perm``)."""
    if w.perm is None:
        return decoded
    n = decoded.shape[-2]
    perm = w.perm.to(device=decoded.device, dtype=torch.long)
    if perm.dim() == decoded.dim() - 1:  # one order: [..., K]
        index = perm.unsqueeze(-2).expand(*perm.shape[:-1], n, perm.shape[-1])
    else:  # per fused part [..., P, K]: output features of part p take row p
        part_of = torch.zeros(n, dtype=torch.long, device=decoded.device)
        for i, lo in enumerate(part_bounds(w)[1:-1], start=1):
            part_of[lo:] = i
        index = perm.index_select(-2, part_of)
    out = torch.empty_like(decoded)
    return out.scatter_(-1, index, decoded)
