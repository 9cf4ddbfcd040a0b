"""Fold one staged pass into the expert totals in a single Triton kernel (CUDA).

``fold_pass`` does what the torch path of :meth:`ExpertCounters.fold` does with about a
dozen small kernels: per routing layer, histogram the ids of the first ``num_tokens``
staged rows (ids outside ``[0, num_experts)`` are ignored), add the histogram to the
current and lifetime token totals of ``phase``, add 1 to the activation totals of every
expert that got a token, set those experts' last activation time to ``now``, and reset
the first ``clear_rows`` staged rows to ``-1``. One program per layer owns that layer's
counters, so no atomics are needed for them. A pass of more than ``SPLIT_ABOVE_ROWS`` rows
(a prefill) is cut into blocks of rows, one program each, whose histograms meet in a scratch
one; a second launch adds it to the totals. ``fold_pass_ref`` is the torch reference.

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
from sglang.srt.enhanced.moe_tracker.counters import PASS_PARAMS, PassOutputs

# Elements of the [ids, experts] comparison tile one program holds at a time.
_TILE = 8192
# Passes of more rows than this are cut into blocks of TOKENS_PER_PROGRAM rows per layer: one
# program each, their histograms added into a scratch one (atomics), then a second launch
# adds that to the totals. A smaller pass is one program per layer, one launch.
SPLIT_ABOVE_ROWS = 256
TOKENS_PER_PROGRAM = 128
# Tokens per step of the per-request and pair loop. The tile sizes do not depend on the pass's
# size, so a server compiles each variant once (see warm_up), not at each new prefill length.
BLOCK_T = 64


@triton.jit
def _count_rows(
    base, layer, t0, t1, c1, num_experts, request_ptr, token_rows_ptr, request_row_stride, coact_ptr,
    BLOCK_IDS: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
    REQUESTS: tl.constexpr, COACT: tl.constexpr,
):  # fmt: skip
    """Histogram of one layer's staged rows ``[t0, t1)``, their per-request and pair counts; rows ``[t0, c1)`` reset."""
    experts = tl.arange(0, BLOCK_E)
    hist = tl.zeros([BLOCK_E], dtype=tl.int32)
    # while loops (not range) so the Triton interpreter also runs this with scalar bounds.
    start = t0 * TOP_K
    while start < t1 * TOP_K:
        offs = start + tl.arange(0, BLOCK_IDS)
        ids = tl.load(base + offs, mask=offs < t1 * TOP_K, other=-1)
        hist += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        start += BLOCK_IDS
    if REQUESTS or COACT:
        start = t0
        while start < t1:
            toks = start + tl.arange(0, BLOCK_T)
            live = toks < t1
            if REQUESTS:
                req_row = tl.load(token_rows_ptr + toks, mask=live, other=-1).to(tl.int64)
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
    start = t0 * TOP_K
    while start < c1 * TOP_K:
        offs = start + tl.arange(0, BLOCK_IDS)
        tl.store(base + offs, tl.full([BLOCK_IDS], -1, tl.int32), mask=offs < c1 * TOP_K)
        start += BLOCK_IDS
    return hist


@triton.jit
def _add_to_totals(
    hist, layer, counts_ptr, last_ptr, num_experts, lifetime_stride, activations_stride, phase_offset, layer_stride,
    now_seconds, now_fraction, ring_ptr, ring_offset, BLOCK_E: tl.constexpr, RING: tl.constexpr,
):  # fmt: skip
    """Add one layer's pass histogram to its current and lifetime totals, last times and ring slot."""
    experts = tl.arange(0, BLOCK_E)
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


# No integer argument is specialised (Triton compiles a variant per "== 1" / "divisible by 16"
# value): per-pass ones (token counts, time, ring slot) would compile new variants as a server
# runs, shape ones would make warm_up's scratch tensors compile other variants than the tracker's.
_TOTALS_INTS = ["num_experts", "lifetime_stride", "activations_stride", "phase_offset", "layer_stride",
                "now_seconds", "ring_offset"]  # fmt: skip
_FOLD_INTS = ["num_tokens", "clear_rows", "rows_per_program", "staging_layer_stride", *_TOTALS_INTS,
              "request_row_stride"]  # fmt: skip


@triton.jit(do_not_specialize=_FOLD_INTS)
def _fold_pass_kernel(
    staging_ptr, counts_ptr, last_ptr, hist_ptr,
    num_tokens, clear_rows, rows_per_program, staging_layer_stride, num_experts,
    lifetime_stride, activations_stride, phase_offset, layer_stride, now_seconds, now_fraction,
    ring_ptr, ring_offset, request_ptr, token_rows_ptr, request_row_stride, coact_ptr, params_ptr,
    BLOCK_IDS: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
    RING: tl.constexpr, REQUESTS: tl.constexpr, COACT: tl.constexpr, SPLIT: tl.constexpr, PARAMS: tl.constexpr,
):  # fmt: skip
    """Program ``(layer, block)``: rows ``[block * rows_per_program, ...)`` of one layer.

    Not SPLIT (one block per layer): the histogram goes straight into the totals. SPLIT: it is
    added into ``hist_ptr`` int32 ``[layers, num_experts]`` for :func:`_fold_totals_kernel`.
    PARAMS: the per-pass values come from ``params_ptr`` (see :func:`encode_pass_params`), not
    from the arguments of the same names, so a CUDA graph can hold the launch.
    """
    if PARAMS:
        num_tokens = tl.load(params_ptr).to(tl.int32)
        phase_offset = tl.load(params_ptr + 1)
        now_seconds = tl.load(params_ptr + 2)
        now_fraction = tl.load(params_ptr + 3).to(tl.float64) / 1e9
        ring_offset = tl.load(params_ptr + 4)
    layer = tl.program_id(0)
    t0 = tl.program_id(1) * rows_per_program
    t1 = tl.minimum(t0 + rows_per_program, num_tokens)
    c1 = tl.minimum(t0 + rows_per_program, clear_rows)
    base = staging_ptr + layer.to(tl.int64) * staging_layer_stride
    hist = _count_rows(base, layer, t0, t1, c1, num_experts, request_ptr, token_rows_ptr, request_row_stride,
                       coact_ptr, BLOCK_IDS, BLOCK_E, TOP_K, BLOCK_T, REQUESTS, COACT)  # fmt: skip
    if SPLIT:
        experts = tl.arange(0, BLOCK_E)
        tl.atomic_add(hist_ptr + layer * num_experts + experts, hist, mask=(experts < num_experts) & (hist > 0),
                      sem="relaxed")  # fmt: skip
    else:
        _add_to_totals(hist, layer, counts_ptr, last_ptr, num_experts, lifetime_stride, activations_stride,
                       phase_offset, layer_stride, now_seconds, now_fraction, ring_ptr, ring_offset, BLOCK_E, RING)  # fmt: skip


@triton.jit(do_not_specialize=_TOTALS_INTS)
def _fold_totals_kernel(
    hist_ptr, counts_ptr, last_ptr, num_experts, lifetime_stride, activations_stride, phase_offset, layer_stride,
    now_seconds, now_fraction, ring_ptr, ring_offset, BLOCK_E: tl.constexpr, RING: tl.constexpr,
):  # fmt: skip
    """One program per layer: the SPLIT pass's summed histogram into the totals."""
    layer = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    hist = tl.load(hist_ptr + layer * num_experts + experts, mask=experts < num_experts, other=0)
    _add_to_totals(hist, layer, counts_ptr, last_ptr, num_experts, lifetime_stride, activations_stride,
                   phase_offset, layer_stride, now_seconds, now_fraction, ring_ptr, ring_offset, BLOCK_E, RING)  # fmt: skip


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


def _check_outputs(out: PassOutputs, layers: int, num_experts: int, num_tokens: int,
                   slot_dtypes: tuple[torch.dtype, ...] = (torch.int64,)) -> None:
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
        out.token_rows is None or out.token_rows.dtype not in slot_dtypes or out.token_rows.numel() < num_tokens
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

    One kernel launch (two above ``SPLIT_ABOVE_ROWS`` rows), no host sync. Row counts are clipped
    to the staging buffer.
    ``outputs`` adds the ring slot, per-request and co-activation counts.
    """
    _check(staging, counts, last, phase, num_experts)
    out = outputs or PassOutputs()
    layers, rows, top_k = staging.shape
    num_tokens, clear_rows = min(max(num_tokens, 0), rows), min(max(clear_rows, 0), rows)
    _check_outputs(out, layers, num_experts, num_tokens)
    if layers == 0 or num_experts == 0 or (num_tokens == 0 and clear_rows == 0 and out.ring is None):
        return
    split = max(num_tokens, clear_rows) > SPLIT_ABOVE_ROWS
    values = encode_pass_params(num_tokens, phase, now, out.ring_slot, counts, layers, num_experts)
    _launch(staging, counts, last, num_experts, out, clear_rows, values, split=split,
            requests=out.request_counts is not None and num_tokens > 0,
            coact=out.coactivation is not None and num_tokens > 0 and top_k > 1)  # fmt: skip


def encode_pass_params(
    num_tokens: int, phase: int, now: float, ring_slot: int, counts: torch.Tensor, layers: int, num_experts: int
) -> list[int]:
    """A pass's values as :func:`fold_pass_from_params` reads them (``PASS_PARAMS`` int64s, in order):
    tokens, ``phase``'s offset into ``counts``, ``now`` in whole seconds and the nanoseconds after,
    the ring slot's offset."""
    seconds = math.floor(now)
    return [num_tokens, phase * counts.stride(2), seconds, round((now - seconds) * 1e9),
            ring_slot * layers * num_experts]  # fmt: skip


def fold_pass_from_params(
    staging: torch.Tensor,
    clear_rows: int,
    counts: torch.Tensor,
    last: torch.Tensor,
    params: torch.Tensor,
    num_experts: int,
    outputs: PassOutputs | None = None,
) -> None:
    """:func:`fold_pass` with the pass's token count, phase, time and ring slot read on the device
    from ``params`` (int64, :func:`encode_pass_params`), so one launch inside a CUDA graph folds
    each replay with the values written before it. One program per layer; rows ``[:clear_rows]`` are
    cleared and bound the token count. ``outputs.token_rows`` may be int32 here."""
    _check(staging, counts, last, 0, num_experts)
    out = outputs or PassOutputs()
    layers, rows, top_k = staging.shape
    clear_rows = min(max(clear_rows, 0), rows)
    _check_outputs(out, layers, num_experts, clear_rows, (torch.int64, torch.int32))
    if params.dtype != torch.int64 or params.numel() < PASS_PARAMS or params.device != staging.device \
            or not params.is_contiguous():
        raise EnhancedError(f"params must be {PASS_PARAMS} contiguous int64 values on {staging.device}",
                            culprit="params")  # fmt: skip
    if layers == 0 or num_experts == 0:
        return
    _launch(staging, counts, last, num_experts, out, clear_rows, [0] * PASS_PARAMS, split=False,
            requests=out.request_counts is not None, coact=out.coactivation is not None and top_k > 1,
            params=params)  # fmt: skip


def _launch(
    staging: torch.Tensor, counts: torch.Tensor, last: torch.Tensor, num_experts: int, out: PassOutputs,
    clear_rows: int, values: list[int], *, split: bool, requests: bool, coact: bool,
    params: torch.Tensor | None = None,
) -> None:  # fmt: skip
    layers, rows, top_k = staging.shape
    num_tokens, phase_offset, seconds, nanoseconds, ring_offset = values
    block_e = triton.next_power_of_2(num_experts)
    per_program = TOKENS_PER_PROGRAM if split else max(num_tokens, clear_rows, 1)
    blocks = triton.cdiv(max(num_tokens, clear_rows, 1), per_program)
    hist = torch.zeros(layers, num_experts, dtype=torch.int32, device=staging.device) if split else counts
    totals = (
        counts.stride(0), counts.stride(1), phase_offset, counts.stride(3), seconds, nanoseconds / 1e9,
        out.ring if out.ring is not None else counts, ring_offset,
    )  # fmt: skip
    _fold_pass_kernel[(layers, blocks)](
        staging, counts, last, hist,
        num_tokens, clear_rows, per_program, rows * top_k, num_experts, *totals,
        out.request_counts if requests else counts,
        out.token_rows if requests else counts,
        layers * num_experts,
        out.coactivation if coact else counts,
        params if params is not None else counts,
        BLOCK_IDS=max(16, _TILE // block_e), BLOCK_E=block_e, TOP_K=top_k, BLOCK_T=BLOCK_T,
        RING=out.ring is not None, REQUESTS=requests, COACT=coact, SPLIT=split, PARAMS=params is not None,
    )  # fmt: skip
    if split:
        _fold_totals_kernel[(layers,)](hist, counts, last, num_experts, *totals, BLOCK_E=block_e,
                                       RING=out.ring is not None)  # fmt: skip


def warm_up(num_experts: int, top_k: int, device: torch.device, *, ring: bool, coactivation: bool) -> None:
    """Compile the fold's variants a server meets (one program per layer or split, or read from
    params for CUDA graphs; with and without per-request counts, int64 or int32 request slots) on
    scratch tensors, so no pass waits for the compiler and no graph capture compiles."""
    counts = torch.zeros(2, 2, 2, 1, num_experts, dtype=torch.int64, device=device)
    last = torch.zeros(1, num_experts, dtype=torch.float64, device=device)
    params = torch.zeros(PASS_PARAMS, dtype=torch.int64, device=device)
    rows = SPLIT_ABOVE_ROWS + 1
    variants = [(tokens, torch.int64) for tokens in (1, rows)] + [(None, torch.int64), (None, torch.int32)]
    for tokens, slot_dtype in variants:
        for requests in (False, True):
            out = PassOutputs(
                ring=torch.zeros(1, 1, num_experts, dtype=torch.int32, device=device) if ring else None,
                request_counts=torch.zeros(1, 1, num_experts, dtype=torch.int32, device=device) if requests else None,
                token_rows=torch.zeros(rows, dtype=slot_dtype, device=device) if requests else None,
                coactivation=torch.zeros(1, num_experts, num_experts, dtype=torch.int64, device=device)
                if coactivation else None,
            )
            staging = torch.zeros(1, rows, top_k, dtype=torch.int32, device=device)
            if tokens is None:
                fold_pass_from_params(staging, 1, counts, last, params, num_experts, out)
            else:
                fold_pass(staging, tokens, tokens, counts, last, 0, 0.0, num_experts, out)


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
