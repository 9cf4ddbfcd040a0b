"""Fold one staged pass into the expert totals in a single Triton kernel (CUDA).

``fold_pass`` does what the torch path of :meth:`ExpertCounters.fold` does with about a
dozen small kernels: per routing layer, histogram the ids of the first ``num_tokens``
staged rows (ids outside ``[0, num_experts)`` are ignored), add the histogram to the
current and lifetime token totals of ``phase``, add 1 to the activation totals of every
expert that got a token, set those experts' last activation time to ``now``, and reset
the first ``clear_rows`` staged rows to ``-1``. One program per layer owns that layer's
counters, so no atomics are needed. ``fold_pass_ref`` is the torch reference.

Layouts: ``staging`` int32 ``[layers, rows, top_k]`` contiguous; ``counts`` int64
``[current/lifetime, tokens/activations, phase, total_layers, total_experts]`` contiguous
(``total_layers >= layers``, ``total_experts >= num_experts``); ``last`` float64
``[total_layers, total_experts]`` contiguous.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError

# Elements of the [ids, experts] comparison tile one program holds at a time.
_TILE = 8192


@triton.jit
def _fold_pass_kernel(
    staging_ptr,
    counts_ptr,
    last_ptr,
    num_ids,
    clear_ids,
    staging_layer_stride,
    num_experts,
    lifetime_stride,
    activations_stride,
    phase_offset,
    layer_stride,
    now_seconds,
    now_fraction,
    BLOCK_IDS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    layer = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    base = staging_ptr + layer.to(tl.int64) * staging_layer_stride
    hist = tl.zeros([BLOCK_E], dtype=tl.int32)
    # while loops (not range) so the Triton interpreter also runs this with scalar bounds.
    start = 0
    while start < num_ids:
        offs = start + tl.arange(0, BLOCK_IDS)
        ids = tl.load(base + offs, mask=offs < num_ids, other=-1)
        hist += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        start += BLOCK_IDS
    start = 0
    while start < clear_ids:
        offs = start + tl.arange(0, BLOCK_IDS)
        tl.store(base + offs, tl.full([BLOCK_IDS], -1, tl.int32), mask=offs < clear_ids)
        start += BLOCK_IDS
    in_range = experts < num_experts
    hit = hist > 0
    tokens = hist.to(tl.int64)
    active = hit.to(tl.int64)
    row = counts_ptr + phase_offset + layer.to(tl.int64) * layer_stride + experts
    for life in tl.static_range(2):
        t_ptr = row + life * lifetime_stride
        tl.store(t_ptr, tl.load(t_ptr, mask=in_range, other=0) + tokens, mask=in_range)
        a_ptr = t_ptr + activations_stride
        tl.store(a_ptr, tl.load(a_ptr, mask=in_range, other=0) + active, mask=in_range)
    now = now_seconds.to(tl.float64) + now_fraction
    tl.store(
        last_ptr + layer.to(tl.int64) * layer_stride + experts,
        tl.full([BLOCK_E], 0.0, tl.float64) + now,
        mask=in_range & hit,
    )


def _check(staging: torch.Tensor, counts: torch.Tensor, last: torch.Tensor, phase: int, num_experts: int) -> None:
    if staging.dim() != 3 or staging.dtype != torch.int32 or not staging.is_contiguous():
        raise EnhancedError("staging must be a contiguous int32 [layers, rows, top_k] tensor", culprit="staging")
    if counts.dim() != 5 or counts.dtype != torch.int64 or not counts.is_contiguous() or counts.shape[:2] != (2, 2):
        raise EnhancedError("counts must be a contiguous int64 [2, 2, phases, layers, experts] tensor",
                            culprit="counts")
    if last.dtype != torch.float64 or not last.is_contiguous() or tuple(last.shape) != tuple(counts.shape[3:]):
        raise EnhancedError("last must be a contiguous float64 [layers, experts] tensor", culprit="last")
    if staging.shape[0] > counts.shape[3] or num_experts > counts.shape[4] or not 0 <= phase < counts.shape[2]:
        raise EnhancedError(
            f"staging of {staging.shape[0]} layers / {num_experts} experts / phase {phase} does not fit "
            f"counts of shape {tuple(counts.shape)}",
            culprit="counts",
        )


def fold_pass(
    staging: torch.Tensor,
    num_tokens: int,
    clear_rows: int,
    counts: torch.Tensor,
    last: torch.Tensor,
    phase: int,
    now: float,
    num_experts: int,
) -> None:
    """Fold rows ``[:num_tokens]`` of ``staging`` into ``counts`` / ``last``, then clear ``[:clear_rows]``.

    One kernel launch, no host sync. Row counts are clipped to the staging buffer.
    """
    _check(staging, counts, last, phase, num_experts)
    layers, rows, top_k = staging.shape
    num_tokens, clear_rows = min(max(num_tokens, 0), rows), min(max(clear_rows, 0), rows)
    if layers == 0 or num_experts == 0 or (num_tokens == 0 and clear_rows == 0):
        return
    block_e = triton.next_power_of_2(num_experts)
    block_ids = max(16, min(triton.next_power_of_2(max(num_tokens * top_k, 1)), max(16, _TILE // block_e)))
    seconds = math.floor(now)
    _fold_pass_kernel[(layers,)](
        staging, counts, last,
        num_tokens * top_k, clear_rows * top_k, rows * top_k, num_experts,
        counts.stride(0), counts.stride(1), phase * counts.stride(2), counts.stride(3),
        int(seconds), float(now - seconds),
        BLOCK_IDS=block_ids, BLOCK_E=block_e,
    )  # fmt: skip


def fold_pass_ref(
    staging: torch.Tensor,
    num_tokens: int,
    clear_rows: int,
    counts: torch.Tensor,
    last: torch.Tensor,
    phase: int,
    now: float,
    num_experts: int,
) -> None:
    """Torch reference of :func:`fold_pass` (same arguments, same in-place effect)."""
    _check(staging, counts, last, phase, num_experts)
    layers, rows, _ = staging.shape
    num_tokens, clear_rows = min(max(num_tokens, 0), rows), min(max(clear_rows, 0), rows)
    for layer in range(layers):
        ids = staging[layer, :num_tokens].reshape(-1).to(torch.int64)
        ids = ids[(ids >= 0) & (ids < num_experts)]
        hist = torch.bincount(ids, minlength=num_experts)
        hit = hist > 0
        counts[:, 0, phase, layer, :num_experts] += hist
        counts[:, 1, phase, layer, :num_experts] += hit
        last[layer, :num_experts][hit] = now
    staging[:, :clear_rows] = -1
