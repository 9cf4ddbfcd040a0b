"""Device-path counters (begin_pass / record_routing / end_pass) against hand-computed counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker import tracker as tracker_mod
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(tracker_mod, "time", fake)
    return fake


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def test_one_pass_counts_real_rows_only(clock: FakeClock) -> None:
    # Layer 0 is dense (never records); layers 1 and 2 route 3 real tokens + 2 padding rows.
    t = ExpertActivationTracker(3, 4, 2, max_tokens=8, layer_ids=[1, 2])
    t.begin_pass(5, is_decode=False)
    t.record_routing(1, ids([[0, 1], [0, 2], [3, -1], [1, 1], [1, 1]]))
    t.record_routing(2, ids([[2, 3], [2, -1], [-1, -1], [0, 0], [0, 0]]))
    assert torch.all(t._counters.staged()[0] == -1)
    t.end_pass(3)
    snap = t.snapshot()
    assert snap.tokens[PREFILL].tolist() == [[0, 0, 0, 0], [2, 1, 1, 1], [0, 0, 2, 1]]
    assert snap.activations[PREFILL].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert snap.tokens[DECODE].sum().item() == 0
    assert snap.last_activation_time.tolist() == [[0, 0, 0, 0], [1000.0] * 4, [0, 0, 1000.0, 1000.0]]
    assert snap.num_passes == {"prefill": 1, "decode": 0}
    # The staging buffer is cleared for the next pass, padding rows included.
    assert torch.all(t._counters.staged() == -1)


def test_passes_phases_and_last_time(clock: FakeClock) -> None:
    t = ExpertActivationTracker(1, 3, 1, max_tokens=4)
    t.begin_pass(3, is_decode=False)
    t.record_routing(0, ids([[0], [0], [1]]))
    t.end_pass()
    clock.now = 2000.0
    for _ in range(2):
        t.begin_pass(2, is_decode=True)
        t.record_routing(0, ids([[0], [2]]))
        t.end_pass()
    snap = t.snapshot()
    assert snap.tokens[PREFILL, 0].tolist() == [2, 1, 0]
    assert snap.tokens[DECODE, 0].tolist() == [2, 0, 2]
    assert snap.activations[PREFILL, 0].tolist() == [1, 1, 0]
    assert snap.activations[DECODE, 0].tolist() == [2, 0, 2]
    assert snap.last_activation_time[0].tolist() == [2000.0, 1000.0, 2000.0]
    assert snap.num_passes == {"prefill": 1, "decode": 2}


def test_random_passes_match_reference() -> None:
    rng = random.Random(0)
    num_layers, num_experts, top_k = 4, 6, 3
    t = ExpertActivationTracker(num_layers, num_experts, top_k, max_tokens=16, layer_ids=[0, 2, 3])
    ref_tokens = [[Counter() for _ in range(num_layers)] for _ in range(2)]
    ref_acts = [[Counter() for _ in range(num_layers)] for _ in range(2)]
    for _ in range(12):
        padded = rng.randint(1, 16)
        real = rng.randint(0, padded)
        phase = rng.randint(0, 1)
        t.begin_pass(padded, is_decode=bool(phase))
        for layer in (0, 2, 3):
            rows = [[rng.choice([-1, *range(num_experts)]) for _ in range(top_k)] for _ in range(padded)]
            t.record_routing(layer, ids(rows))
            seen = Counter(e for row in rows[:real] for e in row if e >= 0)
            ref_tokens[phase][layer].update(seen)
            ref_acts[phase][layer].update(seen.keys())
        t.end_pass(real)
    snap = t.snapshot()
    for phase in (PREFILL, DECODE):
        for layer in range(num_layers):
            expected = [ref_tokens[phase][layer][e] for e in range(num_experts)]
            assert snap.tokens[phase, layer].tolist() == expected
            expected = [ref_acts[phase][layer][e] for e in range(num_experts)]
            assert snap.activations[phase, layer].tolist() == expected
    assert snap.lifetime_tokens.equal(snap.tokens)


def test_overflow_pass_keeps_primary_buffer() -> None:
    t = ExpertActivationTracker(2, 4, 2, max_tokens=4)
    primary = t._counters.staged()
    ptr = primary.data_ptr()
    t.begin_pass(20, is_decode=False)
    t.record_routing(0, torch.full((20, 2), 3, dtype=torch.int64))
    t.record_routing(1, torch.zeros(20, 2, dtype=torch.int64))
    assert t._counters.staged() is not primary
    t.end_pass()
    assert t.max_tokens == 4
    assert t._counters.staged().data_ptr() == ptr
    t.begin_pass(2, is_decode=True)
    t.record_routing(0, ids([[1, 2], [1, -1]]))
    t.end_pass()
    snap = t.snapshot()
    assert snap.tokens[PREFILL].tolist() == [[0, 0, 0, 40], [40, 0, 0, 0]]
    assert snap.tokens[DECODE].tolist() == [[0, 2, 1, 0], [0, 0, 0, 0]]


def test_narrow_and_out_of_range_ids() -> None:
    t = ExpertActivationTracker(1, 4, 3, max_tokens=4)
    t.begin_pass(2, is_decode=False)
    t.record_routing(0, ids([[1], [7]]))  # k=1 < top_k; expert 7 does not exist
    t.end_pass()
    assert t.snapshot().tokens[PREFILL, 0].tolist() == [0, 1, 0, 0]


def test_reset_keeps_lifetime_totals(clock: FakeClock) -> None:
    t = ExpertActivationTracker(1, 2, 1, max_tokens=4)
    for phase in (False, True):
        t.begin_pass(2, is_decode=phase)
        t.record_routing(0, ids([[0], [1]]))
        t.end_pass()
    clock.now = 3000.0
    t.reset_stats()
    snap = t.snapshot()
    assert snap.tokens.sum().item() == 0 and snap.activations.sum().item() == 0
    assert snap.last_activation_time.sum().item() == 0
    assert snap.num_passes == {"prefill": 0, "decode": 0}
    assert snap.lifetime_passes == {"prefill": 1, "decode": 1}
    assert snap.lifetime_tokens.tolist() == [[[1, 1]], [[1, 1]]]
    assert snap.lifetime_activations.tolist() == [[[1, 1]], [[1, 1]]]
    assert snap.start_time == 3000.0 and snap.created_time == 1000.0
    t.begin_pass(1, is_decode=True)
    t.record_routing(0, ids([[1]]))
    t.end_pass()
    snap = t.snapshot()
    assert snap.tokens[DECODE, 0].tolist() == [0, 1]
    assert snap.lifetime_tokens[DECODE, 0].tolist() == [1, 2]


def test_abort_and_empty_passes() -> None:
    t = ExpertActivationTracker(1, 2, 1, max_tokens=4)
    t.begin_pass(2, is_decode=False)
    t.record_routing(0, ids([[0], [1]]))
    t.abort_pass()
    assert not t.in_pass
    t.begin_pass(0, is_decode=False)
    t.end_pass()
    snap = t.snapshot()
    assert snap.tokens.sum().item() == 0
    assert snap.num_passes == {"prefill": 0, "decode": 0}
    assert torch.all(t._counters.staged() == -1)


def test_misuse_raises() -> None:
    t = ExpertActivationTracker(2, 4, 2, max_tokens=4)
    with pytest.raises(EnhancedError, match="without begin_pass"):
        t.end_pass()
    t.begin_pass(2, is_decode=False)
    with pytest.raises(EnhancedError, match="before end_pass"):
        t.begin_pass(2, is_decode=False)
    with pytest.raises(EnhancedError) as err:
        t.record_routing(1, torch.zeros(5, 2, dtype=torch.int32))
    assert err.value.culprit == (1, None)
    with pytest.raises(EnhancedError) as err:
        t.record_routing(5, torch.zeros(1, 2, dtype=torch.int32))
    assert err.value.culprit == (5, None)
    with pytest.raises(EnhancedError, match="outside"):
        t.end_pass(3)
    assert not t.in_pass
    with pytest.raises(EnhancedError, match="device path"):
        ExpertActivationTracker().begin_pass(1, is_decode=False)
    with pytest.raises(EnhancedError) as err:
        ExpertActivationTracker(2, 4, 2, layer_ids=[0, 2])
    assert err.value.culprit == (2, None)


def test_host_records_grow_totals_without_breaking_device_path() -> None:
    t = ExpertActivationTracker(2, 3, 1, max_tokens=4)
    t.begin_pass(2, is_decode=False)
    t.record_routing(1, ids([[2], [2]]))
    t.end_pass()
    t.record_expert_activation(4, 5, tokens_processed=3, is_decode=True)
    assert (t.num_layers, t.num_experts) == (5, 6)
    t.begin_pass(1, is_decode=False)
    t.record_routing(1, ids([[0]]))
    t.end_pass()
    snap = t.snapshot()
    assert snap.tokens[PREFILL, 1].tolist() == [1, 0, 2, 0, 0, 0]
    assert snap.activations[PREFILL, 1].tolist() == [1, 0, 1, 0, 0, 0]
    assert snap.tokens[DECODE, 4, 5].item() == 3 and snap.tokens.sum().item() == 6
    assert snap.layer_ids == [0, 1, 4]


def test_snapshot_is_a_copy() -> None:
    t = ExpertActivationTracker(1, 2, 1, max_tokens=4)
    t.begin_pass(1, is_decode=False)
    t.record_routing(0, ids([[1]]))
    t.end_pass()
    snap = t.snapshot()
    before = [
        x.clone() for x in (snap.tokens, snap.activations, snap.last_activation_time, snap.lifetime_tokens)
    ]
    t.begin_pass(1, is_decode=False)
    t.record_routing(0, ids([[0]]))
    t.end_pass()
    t.reset_stats()
    after = (snap.tokens, snap.activations, snap.last_activation_time, snap.lifetime_tokens)
    assert all(a.equal(b) for a, b in zip(before, after, strict=True))
