"""Token-to-expert alignment for the blocked fused MoE GEMMs (no sgl-kernel needed).

The ``T * top_k`` (token, slot) pairs are grouped by expert, each expert's run padded to a
multiple of ``block_m``, so every ``block_m`` rows of the sorted list belong to one expert.
Fixed output sizes and no host synchronisation: CUDA-graph capturable. Batches of up to
``ONE_PROGRAM_PAIRS`` pairs take one Triton program (one launch: a decode step's alignment is
a few microseconds, not a dozen torch kernels); larger ones, and the CPU, take tensor ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.enhanced.errors import EnhancedError

# The one program ranks CHUNK pairs a step (about 4 us each on an H200): at 512 pairs it takes 20 us,
# at 2048 pairs 63 us; the tensor ops took 51 us at 128 pairs, in about twenty small kernels (benchmarks/RESULTS.md).
ONE_PROGRAM_PAIRS = 1024
CHUNK = 128  # pairs ranked per step of the one-program kernel


@triton.jit(do_not_specialize=["n", "size"])
def _moe_align_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, next_ptr, n, num_experts, block_m, size,
    E_BINS: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """One program: count pairs per expert, pad the runs to ``block_m``, write every block's expert,
    then place the pairs in order (rank within a chunk by comparison, ``next_ptr [E_BINS]`` holds
    each expert's next free row). Bin ``num_experts`` collects the pairs of other ranks (dropped)."""
    bins = tl.arange(0, E_BINS)
    counts = tl.zeros((E_BINS,), tl.int32)
    start = 0
    while start < n:  # while loops: the Triton interpreter runs them with scalar bounds too
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        e = tl.where((e >= 0) & (e < num_experts), e, num_experts)
        counts += tl.histogram(tl.where(offs < n, e, E_BINS - 1), E_BINS)
        start += CHUNK
    is_expert = bins < num_experts
    padded = tl.where(is_expert, (counts + block_m - 1) // block_m * block_m, 0)
    pad_end = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(total_ptr, total)
    tl.store(next_ptr + bins, pad_end - padded)
    start = 0
    while start < size:  # padding rows
        offs = start + tl.arange(0, 1024)
        tl.store(sorted_ptr + offs, tl.full((1024,), 0, tl.int32) + n, mask=offs < size)
        start += 1024
    ends = tl.where(is_expert, pad_end, total + 1)
    start = 0
    while start * block_m < size:  # each block's expert: how many runs end at or before its first row
        blocks = start + tl.arange(0, FILL)
        first = blocks * block_m
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), 1)
        tl.store(expert_ids_ptr + blocks, tl.where(first < total, expert, -1), mask=first < size)
        start += FILL
    tl.debug_barrier()
    start = 0
    while start < n:
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        keep = (e >= 0) & (e < num_experts) & (offs < n)
        e = tl.where(keep, e, num_experts)
        before = (e[:, None] == e[None, :]) & (tl.arange(0, CHUNK)[None, :] < tl.arange(0, CHUNK)[:, None])
        rank = tl.sum(before.to(tl.int32), 1)
        dest = tl.load(next_ptr + e) + rank
        tl.store(sorted_ptr + dest, offs, mask=keep)
        tl.debug_barrier()
        nxt = tl.load(next_ptr + bins) + tl.histogram(tl.where(offs < n, e, E_BINS - 1), E_BINS)
        tl.debug_barrier()
        tl.store(next_ptr + bins, nxt)
        tl.debug_barrier()
        start += CHUNK


def max_padded_pairs(num_pairs: int, block_m: int, num_experts: int) -> int:
    """Length of ``sorted_token_ids``: room for every expert's padding."""
    return min(num_pairs * block_m, num_pairs + num_experts * (block_m - 1))


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs of ``topk_ids [T, k]`` by expert in ``block_m``-row blocks.

    Returns ``sorted_token_ids`` int32 (pair index ``t * k + j``; padding = ``T * k``),
    ``expert_ids`` int32 per block (-1 for blocks past the end) and ``num_tokens_post_padded``
    int32 ``[1]``. Pairs whose id lies outside ``[0, num_experts)`` (experts of another rank)
    are left out. Within an expert, pairs keep their original order.
    """
    if block_m <= 0 or num_experts <= 0:
        raise EnhancedError(f"block_m {block_m} and num_experts {num_experts} must be positive",
                            culprit="block_m")  # fmt: skip
    n = topk_ids.numel()
    if topk_ids.is_cuda and n <= ONE_PROGRAM_PAIRS:
        return _align_one_program(topk_ids, block_m, num_experts)
    return _align_tensor_ops(topk_ids, block_m, num_experts)


def _align_one_program(topk_ids: torch.Tensor, block_m: int, num_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    n = topk_ids.numel()
    size = max(max_padded_pairs(n, block_m, num_experts), block_m)
    device = topk_ids.device
    sorted_ids = torch.empty((size,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((triton.cdiv(size, block_m),), dtype=torch.int32, device=device)
    total = torch.empty((1,), dtype=torch.int32, device=device)
    bins = triton.next_power_of_2(num_experts + 1)
    scratch = torch.empty((bins,), dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    _moe_align_kernel[(1,)](ids, sorted_ids, expert_ids, total, scratch, n, num_experts, block_m, size,
                            E_BINS=bins, CHUNK=CHUNK, FILL=max(16, 8192 // bins), num_warps=4)  # fmt: skip
    return sorted_ids, expert_ids, total


def _align_tensor_ops(topk_ids: torch.Tensor, block_m: int, num_experts: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    size = max(max_padded_pairs(n, block_m, num_experts), block_m)
    bucket = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # last bucket: dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    beyond = torch.full((1,), size, dtype=torch.int64, device=device)  # dropped pairs land past the end
    pad_start = torch.cat([pad_end - padded, beyond])
    sorted_bucket, order = torch.sort(bucket, stable=True)
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - run_start[sorted_bucket]
    dest = pad_start[sorted_bucket] + rank
    sorted_ids = torch.full((size + 1,), n, dtype=torch.int64, device=device)
    sorted_ids.scatter_(0, torch.clamp(dest, max=size), order)
    total = pad_end[num_experts - 1 :]
    block_starts = torch.arange(0, size, block_m, device=device)
    experts = torch.searchsorted(pad_end, block_starts, right=True)
    experts = torch.where(block_starts < total, experts, -1)
    return sorted_ids[:size].to(torch.int32), experts.to(torch.int32), total.to(torch.int32)


def moe_align_ref(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[list[int], list[int]]:
    """Loop reference: (sorted pair ids without padding per block, expert of each used block)."""
    flat = topk_ids.reshape(-1).tolist()
    rows: list[int] = []
    experts: list[int] = []
    for e in range(num_experts):
        pairs = [i for i, x in enumerate(flat) if x == e]
        for b in range(0, len(pairs), block_m):
            chunk = pairs[b : b + block_m]
            rows += chunk + [len(flat)] * (block_m - len(chunk))
            experts.append(e)
    return rows, experts
