"""Packed GPTQ and FP8 weights as served: what packed serving keeps after loading and hands to the
fused MoE and linear kernels (checkpoint layout, stacked over experts). The one description of a
packed weight set; torch only, so it imports without SGLang's runtime or Triton.

GPTQ (``K`` input features, ``N`` output features; a leading expert dim ``E`` for MoE weights,
absent for one dense linear weight):

- ``qweight`` int32 ``[E, K*bits/32, N]`` (packed along K, GPTQ bit stream, see ``packing.py``)
- ``qzeros`` int32 ``[E, G, N*bits/32]`` (packed along N; ``G`` groups along K)
- ``scales`` fp16/bf16 ``[E, G, N]``
- ``g_idx`` int32 ``[E, K]`` (act-order, one row order for every output), None, or ``[E, P, K]``
  for a weight of ``P`` fused parts with their own orders, part ``p`` covering output features
  ``bounds[p]:bounds[p + 1]`` (the MoE kernels take ``P = 2``: a gate/up weight, row 0 = gate
  columns, row 1 = up columns)
- ``zero_offset`` 1 for ``gptq`` (v1, stored zero + 1), 0 for ``gptq_v2``
- ``perm`` int32, shaped like ``g_idx`` (None: rows in checkpoint order): set when the rows of an
  act-order weight were sorted by group at load (``act_order.sort_act_order``); packed row ``r``
  then holds input feature ``perm[r]``, ``g_idx`` is None and the groups are regular

FP8 e4m3: ``weight`` ``[E, N, K]``; ``scale`` float32, block scales ``[E, ceil(N/bo), ceil(K/bi)]``
with ``block_size=(bo, bi)``, or per-channel ``[E, N]`` with ``block_size=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTQExperts:
    """Stacked GPTQ experts ``[E, ...]``, or one linear weight (no expert dim)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    zero_offset: int
    bounds: tuple[int, ...] = ()  # fused parts' output boundaries (0, ..., N), for a g_idx per part
    perm: torch.Tensor | None = None  # input feature of each packed row (rows sorted at load), or None

    @property
    def row_order(self) -> torch.Tensor | None:
        """The per-input-row tensor the weight carries: ``g_idx`` (stored order) or ``perm`` (sorted), or None."""
        return self.g_idx if self.g_idx is not None else self.perm

    @property
    def g_idx_per_part(self) -> bool:
        """True when ``g_idx`` (or ``perm``) has one row per fused part (``[..., P, K]``)."""
        rows = self.row_order
        return rows is not None and rows.dim() == self.qweight.dim()

    def expert(self, e: int) -> GPTQExperts:
        g = self.g_idx[e] if self.g_idx is not None else None
        perm = self.perm[e] if self.perm is not None else None
        return GPTQExperts(self.qweight[e], self.qzeros[e], self.scales[e], g, self.bits, self.group_size,
                           self.zero_offset, self.bounds, perm)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-2] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[-2]


@dataclass(frozen=True)
class FP8Experts:
    """Stacked FP8 experts ``[E, N, K]`` (or one linear weight ``[N, K]``) with their scales."""

    weight: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int] | None

    def expert(self, e: int) -> FP8Experts:
        return FP8Experts(self.weight[e], self.scale[e], self.block_size)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]
