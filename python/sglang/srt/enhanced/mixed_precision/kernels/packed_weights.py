"""Packed weights handed to the fused MoE and linear kernels (checkpoint layout, stacked over experts).

GPTQ (``K`` input features, ``N`` output features; a leading expert dim ``E`` for MoE weights,
absent for one dense linear weight):

- ``qweight`` int32 ``[E, K*bits/32, N]`` (packed along K, GPTQ bit stream, see ``packing.py``)
- ``qzeros`` int32 ``[E, G, N*bits/32]`` (packed along N; ``G`` groups along K)
- ``scales`` fp16/bf16 ``[E, G, N]``
- ``g_idx`` int32 ``[E, K]`` (act-order), ``[E, 2, K]`` for a fused gate/up weight whose halves have
  their own ``g_idx`` (row 0 = gate columns, row 1 = up columns), or None
- ``zero_offset`` 1 for ``gptq`` (v1, stored zero + 1), 0 for ``gptq_v2``

FP8 e4m3: ``weight`` ``[E, N, K]``; ``scale`` float32, block scales ``[E, ceil(N/bo), ceil(K/bi)]``
with ``block_size=(bo, bi)``, or per-channel ``[E, N]`` with ``block_size=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTQExperts:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    zero_offset: int

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
    weight: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int] | None

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]
