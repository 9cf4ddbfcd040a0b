"""Fold one staged pass into the expert totals in a single Triton kernel (CUDA).

``fold_pass`` does what the torch path of :meth:`ExpertCounters.fold` does with about a
dozen small kernels: per routing layer, histogram the ids of the first ``num_tokens``
staged rows (ids outside ``[0, num_experts)`` are ignored), add the histogram to the
current and lifetime token totals of ``phase``, add 1 to the activation totals of every
expert that got a token, set those experts' last activation time to ``now``, and reset
the first ``clear_rows`` staged rows to ``-1``. One program per layer owns that layer's
counters, so no atomics are needed for them. ``fold_pass_ref`` is the torch reference.

Optional outputs of the same kernel (``PassOutputs``): the pass's histogram written to one
slot of a ring of recent passes (``ring`` int32 ``[slots, layers, num_experts]``); each
token's ids added to its request's row (``request_counts`` int32 ``[rows, layers,
num_experts]``, ``token_rows`` int64 ``[num_tokens]``, ``-1`` = no request); and every pair
``a < b`` of experts one token chose added to ``coactivation`` int64 ``[layers, num_experts,
num_experts]`` at ``[layer, a, b]``. The last two use atomics (tokens of one request, or
pairs, meet at one address); they are relaxed (no ordering is needed, and ordered
atomics serialise the program).

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
from sglang.srt.enhanced.moe_tracker.counters import PassOutputs

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
    ring_ptr,
    ring_offset,
    request_ptr,
    token_rows_ptr,
    request_row_stride,
    coact_ptr,
    num_tokens,
    BLOCK_IDS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RING: tl.constexpr,
    REQUESTS: tl.constexpr,
    COACT: tl.constexpr,
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
    if REQUESTS or COACT:
        start = 0
        while start < num_tokens:
            toks = start + tl.arange(0, BLOCK_T)
            live = toks < num_tokens
            if REQUESTS:
                req_row = tl.load(token_rows_ptr + toks, mask=live, other=-1)
                req_base = request_ptr + req_row * request_row_stride + layer.to(tl.int64) * num_experts
            for i in tl.static_range(TOP_K):
                a = tl.load(base + toks * TOP_K + i, mask=live, other=-1)
                a_ok = live & (a >= 0) & (a < num_experts)
                if REQUESTS:
                    tl.atomic_add(req_base + a, tl.full([BLOCK_T], 1, tl.int32), mask=a_ok & (req_row >= 0),
                                  sem="relaxed")
                if COACT:
                    for j in tl.static_range(i + 1, TOP_K):
                        b = tl.load(base + toks * TOP_K + j, mask=live, other=-1)
                        ok = a_ok & (b >= 0) & (b < num_experts) & (a != b)
                        lo = tl.minimum(a, b).to(tl.int64)
                        hi = tl.maximum(a, b).to(tl.int64)
                        pair = coact_ptr + (layer.to(tl.int64) * num_experts + lo) * num_experts + hi
                        tl.atomic_add(pair, tl.full([BLOCK_T], 1, tl.int64), mask=ok, sem="relaxed")
            start += BLOCK_T
        # Every thread has read its ids before any thread clears them.
        tl.debug_barrier()
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
    if RING:
        tl.store(ring_ptr + ring_offset + layer.to(tl.int64) * num_experts + experts, hist, mask=in_range)


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


def _check_outputs(out: PassOutputs, layers: int, num_experts: int, num_tokens: int) -> None:
    shapes = (
        ("ring", out.ring, torch.int32, lambda t: t.shape[1:] == (layers, num_experts)),
        ("request_counts", out.request_counts, torch.int32, lambda t: t.shape[1:] == (layers, num_experts)),
        ("coactivation", out.coactivation, torch.int64,
         lambda t: tuple(t.shape) == (layers, num_experts, num_experts)),
    )
    for name, tensor, dtype, fits in shapes:
        if tensor is not None and (tensor.dtype != dtype or not tensor.is_contiguous() or not fits(tensor)):
            raise EnhancedError(f"{name} must be a contiguous {dtype} tensor sized for "
                                f"{layers} layers x {num_experts} experts", culprit=name)
    if out.request_counts is not None and (
        out.token_rows is None or out.token_rows.dtype != torch.int64 or out.token_rows.numel() < num_tokens
    ):
        raise EnhancedError("request_counts needs int64 token_rows with one entry per token", culprit="token_rows")


def fold_pass(
    staging: torch.Tensor,
    num_tokens: int,
    clear_rows: int,
    counts: torch.Tensor,
    last: torch.Tensor,
    phase: int,
    now: float,
    num_experts: int,
    outputs: PassOutputs | None = None,
) -> None:
    """Fold rows ``[:num_tokens]`` of ``staging`` into ``counts`` / ``last``, then clear ``[:clear_rows]``.

    One kernel launch, no host sync. Row counts are clipped to the staging buffer.
    ``outputs`` adds the ring slot, per-request and co-activation counts.
    """
    _check(staging, counts, last, phase, num_experts)
    out = outputs or PassOutputs()
    layers, rows, top_k = staging.shape
    num_tokens, clear_rows = min(max(num_tokens, 0), rows), min(max(clear_rows, 0), rows)
    _check_outputs(out, layers, num_experts, num_tokens)
    if layers == 0 or num_experts == 0 or (num_tokens == 0 and clear_rows == 0 and out.ring is None):
        return
    block_e = triton.next_power_of_2(num_experts)
    block_ids = max(16, min(triton.next_power_of_2(max(num_tokens * top_k, 1)), max(16, _TILE // block_e)))
    seconds = math.floor(now)
    requests = out.request_counts is not None and num_tokens > 0
    coact = out.coactivation is not None and num_tokens > 0 and top_k > 1
    _fold_pass_kernel[(layers,)](
        staging, counts, last,
        num_tokens * top_k, clear_rows * top_k, rows * top_k, num_experts,
        counts.stride(0), counts.stride(1), phase * counts.stride(2), counts.stride(3),
        int(seconds), float(now - seconds),
        out.ring if out.ring is not None else counts,
        out.ring_slot * layers * num_experts,
        out.request_counts if requests else counts,
        out.token_rows if requests else counts,
        layers * num_experts,
        out.coactivation if coact else counts,
        num_tokens,
        BLOCK_IDS=block_ids, BLOCK_E=block_e, TOP_K=top_k,
        BLOCK_T=max(16, min(triton.next_power_of_2(max(num_tokens, 1)), 256)),
        RING=out.ring is not None, REQUESTS=requests, COACT=coact,
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
    outputs: PassOutputs | None = None,
) -> None:
    """Torch reference of :func:`fold_pass` (same arguments, same in-place effect), one token at a time."""
    _check(staging, counts, last, phase, num_experts)
    out = outputs or PassOutputs()
    layers, rows, top_k = staging.shape
    num_tokens, clear_rows = min(max(num_tokens, 0), rows), min(max(clear_rows, 0), rows)
    _check_outputs(out, layers, num_experts, num_tokens)
    for layer in range(layers):
        ids = staging[layer, :num_tokens].reshape(-1).to(torch.int64)
        ids = ids[(ids >= 0) & (ids < num_experts)]
        hist = torch.bincount(ids, minlength=num_experts)
        hit = hist > 0
        counts[:, 0, phase, layer, :num_experts] += hist
        counts[:, 1, phase, layer, :num_experts] += hit
        last[layer, :num_experts][hit] = now
        if out.ring is not None:
            out.ring[out.ring_slot, layer] = hist.to(torch.int32)
        for token in range(num_tokens):
            chosen = [int(e) for e in staging[layer, token].tolist() if 0 <= e < num_experts]
            row = int(out.token_rows[token]) if out.request_counts is not None else -1
            for i, a in enumerate(chosen):
                if row >= 0:
                    out.request_counts[row, layer, a] += 1
                if out.coactivation is not None:
                    for b in chosen[i + 1:]:
                        if a != b:
                            out.coactivation[layer, min(a, b), max(a, b)] += 1
    staging[:, :clear_rows] = -1
