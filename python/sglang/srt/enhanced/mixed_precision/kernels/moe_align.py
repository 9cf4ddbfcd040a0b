"""Token-to-expert alignment for the blocked fused MoE GEMMs (no sgl-kernel needed).

The ``T * top_k`` (token, slot) pairs are grouped by expert, each expert's run padded to a
multiple of ``block_m``, so every ``block_m`` rows of the sorted list belong to one expert.
Pure tensor ops with fixed output sizes and no host synchronisation: CUDA-graph capturable,
and the same code runs on the CPU.
"""

from __future__ import annotations

import torch

from sglang.srt.enhanced.errors import EnhancedError


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
