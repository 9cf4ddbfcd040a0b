"""Token-to-expert alignment vs a loop reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the kernel module defines its kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang.srt.enhanced.mixed_precision.kernels.moe_align import (  # noqa: E402
    _align_one_program,
    _align_tensor_ops,
    max_padded_pairs,
    moe_align_block_size,
    moe_align_ref,
)

IMPLEMENTATIONS = {"one-program": _align_one_program, "tensor-ops": _align_tensor_ops}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (7, 5, 3, 4), (33, 16, 4, 8), (64, 3, 1, 16), (70, 40, 4, 4)])
def test_align_matches_loop_reference(t, e, k, block_m, impl, device):
    """(70, 40, 4, 4): 280 pairs, three chunks of the one-program kernel, runs of one expert across chunks."""
    gen = torch.Generator().manual_seed(t * 100 + e)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    sorted_ids, expert_ids, total = IMPLEMENTATIONS[impl](ids.to(device), block_m, e)
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    rows, experts = moe_align_ref(ids, block_m, e)
    assert int(total) == len(rows)
    assert sorted_ids.shape[0] == max(max_padded_pairs(t * k, block_m, e), block_m)
    assert sorted_ids[: len(rows)].tolist() == rows
    assert expert_ids[: len(experts)].tolist() == experts
    assert (expert_ids[len(experts) :] == -1).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_align_drops_experts_of_other_ranks(impl, device):
    ids = torch.tensor([[0, -1], [5, 1], [1, 9]], dtype=torch.int32)  # 6 experts here; -1 and 9 are not
    sorted_ids, expert_ids, total = IMPLEMENTATIONS[impl](ids.to(device), 2, 6)
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    rows, experts = moe_align_ref(ids, 2, 6)
    assert int(total) == len(rows) == 6
    assert sorted_ids[:6].tolist() == rows == [0, 6, 3, 4, 2, 6]
    assert expert_ids[:3].tolist() == experts == [0, 1, 5]


def test_batches_pick_their_implementation(device):
    """The public entry gives the same result whichever implementation the batch size picks."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (9, 2), generator=gen, dtype=torch.int32).to(device)
    got = moe_align_block_size(ids, 4, 7)
    want = _align_tensor_ops(ids, 4, 7)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want, strict=True))
