"""Deferred staging: records are copied together when the last MoE layer records (or at end_pass)."""

from __future__ import annotations

import torch

from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def test_last_layer_first_still_counts_every_layer() -> None:
    t = ExpertActivationTracker(4, 3, 1, max_tokens=4, layer_ids=[0, 1, 3])
    t.begin_pass(2, is_decode=True)
    t.record_routing(3, ids([[2], [2]]))  # the flush layer records first
    t.record_routing(0, ids([[0], [1]]))
    t.record_routing(1, ids([[1], [1]]))
    t.end_pass()
    assert t.snapshot().tokens[DECODE].tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0], [0, 0, 2]]


def test_ids_are_copied_when_the_last_layer_records() -> None:
    t = ExpertActivationTracker(2, 4, 2, max_tokens=4)
    first, last = ids([[0, 1], [2, 3]]), ids([[1, 1], [1, 1]])
    t.begin_pass(2, is_decode=False)
    t.record_routing(0, first)
    t.record_routing(1, last)  # layer 1 is the last MoE layer: both layers are staged now
    first.fill_(3)
    last.fill_(0)  # the callers reuse their tensors afterwards; the staged ids stay
    t.end_pass()
    snap = t.snapshot()
    assert snap.tokens[PREFILL].tolist() == [[1, 1, 1, 1], [0, 4, 0, 0]]
    assert snap.activations[PREFILL].tolist() == [[1, 1, 1, 1], [0, 1, 0, 0]]


def test_aborted_pass_leaves_nothing_pending() -> None:
    t = ExpertActivationTracker(2, 3, 1, max_tokens=4)
    t.begin_pass(1, is_decode=True)
    t.record_routing(0, ids([[2]]))  # layer 1 never records: the forward "raised"
    t.abort_pass()
    t.begin_pass(1, is_decode=True)
    t.record_routing(1, ids([[0]]))
    t.end_pass()
    assert t.snapshot().tokens[DECODE].tolist() == [[0, 0, 0], [1, 0, 0]]
