"""TrackerSnapshot transport (dict/JSON/pickle) and merging of several processes' snapshots."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker import tracker as tracker_mod
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL, TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def _assert_same(a: TrackerSnapshot, b: TrackerSnapshot) -> None:
    for name in ("tokens", "activations", "lifetime_tokens", "lifetime_activations", "last_activation_time"):
        assert getattr(a, name).dtype == getattr(b, name).dtype
        assert getattr(a, name).equal(getattr(b, name)), name
    for name in (
        "num_layers",
        "num_experts",
        "top_k",
        "layer_ids",
        "num_passes",
        "lifetime_passes",
        "requests",
    ):
        assert getattr(a, name) == getattr(b, name), name
    assert (a.start_time, a.created_time, a.snapshot_time) == (b.start_time, b.created_time, b.snapshot_time)


def _device_snapshot() -> TrackerSnapshot:
    t = ExpertActivationTracker(2, 3, 2, max_tokens=4)
    t.begin_pass(2, is_decode=False)
    t.record_routing(0, torch.tensor([[0, 1], [2, 1]]))
    t.record_routing(1, torch.tensor([[2, -1], [2, 0]]))
    t.end_pass()
    t.record_request("r1", 2, 5)
    return t.snapshot()


def test_dict_json_and_pickle_round_trips() -> None:
    snap = _device_snapshot()
    _assert_same(TrackerSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))), snap)
    _assert_same(pickle.loads(pickle.dumps(snap)), snap)
    data = snap.to_dict()
    del data["tokens"]
    with pytest.raises(EnhancedError, match="tokens"):
        TrackerSnapshot.from_dict(data)
    data = snap.to_dict()
    data["activations"] = [[[0]]]
    with pytest.raises(EnhancedError) as err:
        TrackerSnapshot.from_dict(data)
    assert err.value.culprit == "activations"


def test_merge_sums_counts_and_takes_latest_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(100.0)
    monkeypatch.setattr(tracker_mod, "time", clock)
    a = ExpertActivationTracker(max_requests=10)
    a.record_expert_activation(0, 1, 3)
    clock.now = 300.0
    a.record_expert_activation(0, 1, 2, is_decode=True)
    a.record_request("a", 4, 1)
    b = ExpertActivationTracker()
    clock.now = 50.0
    b.record_expert_activation(0, 1, 1)
    clock.now = 200.0
    b.record_expert_activation(2, 3, 7)  # a larger shape than a's
    b.record_request("b", 9, 9)
    sa, sb = a.snapshot(), b.snapshot()
    assert (sa.num_layers, sa.num_experts, sb.num_layers, sb.num_experts) == (1, 2, 3, 4)

    merged = TrackerSnapshot.merge([sa, sb])
    assert (merged.num_layers, merged.num_experts) == (3, 4)
    assert merged.layer_ids == [0, 2]
    assert merged.tokens[PREFILL, 0, 1].item() == 4 and merged.tokens[DECODE, 0, 1].item() == 2
    assert merged.activations[PREFILL, 0, 1].item() == 2 and merged.activations[DECODE, 0, 1].item() == 1
    assert merged.tokens[PREFILL, 2, 3].item() == 7
    assert merged.tokens.sum().item() == 3 + 2 + 1 + 7
    assert merged.lifetime_tokens.equal(merged.tokens)
    assert merged.last_activation_time[0, 1].item() == 300.0
    assert merged.last_activation_time[2, 3].item() == 200.0
    assert [r["request_id"] for r in merged.requests] == ["b", "a"]
    assert merged.start_time == 100.0  # a was created first
    assert merged.snapshot_time == max(sa.snapshot_time, sb.snapshot_time)
    _assert_same(TrackerSnapshot.merge([merged]), merged)
    with pytest.raises(EnhancedError):
        TrackerSnapshot.merge([])
