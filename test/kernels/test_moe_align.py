"""Token-to-expert alignment vs a loop reference."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.enhanced.mixed_precision.kernels.moe_align import (
    max_padded_pairs,
    moe_align_block_size,
    moe_align_ref,
)


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (7, 5, 3, 4), (33, 16, 4, 8), (64, 3, 1, 16)])
def test_align_matches_loop_reference(t, e, k, block_m):
    gen = torch.Generator().manual_seed(t * 100 + e)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    sorted_ids, expert_ids, total = moe_align_block_size(ids, block_m, e)
    rows, experts = moe_align_ref(ids, block_m, e)
    assert int(total) == len(rows)
    assert sorted_ids.shape[0] == max(max_padded_pairs(t * k, block_m, e), block_m)
    assert sorted_ids[: len(rows)].tolist() == rows
    assert expert_ids[: len(experts)].tolist() == experts
    assert (expert_ids[len(experts) :] == -1).all()


def test_align_drops_experts_of_other_ranks():
    ids = torch.tensor([[0, -1], [5, 1], [1, 9]], dtype=torch.int32)  # 6 experts here; -1 and 9 are not
    sorted_ids, expert_ids, total = moe_align_block_size(ids, 2, 6)
    rows, experts = moe_align_ref(ids, 2, 6)
    assert int(total) == len(rows) == 6
    assert sorted_ids[:6].tolist() == rows == [0, 6, 3, 4, 2, 6]
    assert expert_ids[:3].tolist() == experts == [0, 1, 5]
