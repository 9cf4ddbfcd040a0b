"""The original host-path API of ExpertActivationTracker and the module-level functions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker import api
from sglang.srt.enhanced.moe_tracker import tracker as tracker_mod
from sglang.srt.enhanced.moe_tracker.tracker import (
    ExpertActivationTracker,
    get_global_expert_tracker,
    set_global_expert_tracker,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(tracker_mod, "time", fake)
    return fake


@pytest.fixture
def global_tracker() -> Iterator[ExpertActivationTracker]:
    tracker = ExpertActivationTracker()
    set_global_expert_tracker(tracker)
    yield tracker
    set_global_expert_tracker(None)


def test_record_expert_activation_counts_and_grows(clock: FakeClock) -> None:
    t = ExpertActivationTracker()
    t.record_expert_activation(0, 1)
    t.record_expert_activation(0, 1, tokens_processed=4, request_id="r1")
    clock.now = 20.0
    t.record_expert_activation(3, 5, tokens_processed=2, request_id="r1", is_decode=True)
    t.record_expert_activation(3, 0, tokens_processed=0)  # no token, no activation

    assert (t.num_layers, t.num_experts) == (4, 6)
    e01 = t.get_expert_stats(layer_id=0, expert_id=1)
    assert e01 == {
        "layer_id": 0,
        "expert_id": 1,
        "activation_count": 2,
        "last_activation_time": 10.0,
        "total_tokens_processed": 5,
        "prefill_tokens": 5,
        "decode_tokens": 0,
        "prefill_activations": 2,
        "decode_activations": 0,
        "share_of_layer_tokens": 1.0,
    }
    e35 = t.get_expert_stats(layer_id=3, expert_id=5)
    assert (e35["activation_count"], e35["decode_tokens"], e35["last_activation_time"]) == (1, 2, 20.0)
    e30 = t.get_expert_stats(layer_id=3, expert_id=0)
    assert (e30["activation_count"], e30["total_tokens_processed"], e30["last_activation_time"]) == (
        0,
        0,
        None,
    )
    # Only recorded layers are reported; layer 1 never saw an activation.
    assert sorted(t.get_layer_stats()) == [0, 3]
    with pytest.raises(EnhancedError) as err:
        t.get_expert_stats(layer_id=1)
    assert err.value.culprit == (1, None)


def test_requests_are_recorded_and_bounded(clock: FakeClock) -> None:
    t = ExpertActivationTracker(max_requests=2)
    t.record_expert_activation(0, 0, 3, request_id="a")
    t.record_expert_activation(0, 1, 2, request_id="a")
    clock.now = 11.0
    t.record_request("a", input_length=7, output_length=4)
    t.record_request("b", 1, 1)
    requests = t.get_expert_stats()["requests"]
    assert requests[0] == {
        "request_id": "a",
        "input_length": 7,
        "output_length": 4,
        "time": 11.0,
        "expert_activations": 2,
        "tokens_routed": 5,
    }
    t.record_request("c", 2, 2)
    assert [r["request_id"] for r in t.snapshot().requests] == ["b", "c"]
    with pytest.raises(EnhancedError) as err:
        t.record_request("d", -1, 0)
    assert err.value.culprit == "d"


def test_top_experts_layer_stats_and_reset(clock: FakeClock) -> None:
    t = ExpertActivationTracker()
    for layer, expert, tokens in [(0, 0, 5), (0, 1, 9), (1, 2, 9), (1, 0, 1), (1, 1, 5)]:
        t.record_expert_activation(layer, expert, tokens)
    top = t.get_top_experts(top_k=4)
    assert [(e["layer_id"], e["expert_id"], e["total_tokens_processed"]) for e in top] == [
        (0, 1, 9),
        (1, 2, 9),
        (0, 0, 5),
        (1, 1, 5),
    ]
    layers = t.get_layer_stats()
    assert set(layers) == {0, 1}
    assert layers[0]["total_tokens"] == 14 and layers[0]["total_experts"] == 3
    assert layers[1]["experts"]["2"] == {
        "activation_count": 1,
        "total_tokens_processed": 9,
        "prefill_tokens": 9,
        "decode_tokens": 0,
        "prefill_activations": 1,
        "decode_activations": 0,
    }
    t.reset_stats()
    assert t.get_top_experts() == []
    assert t.get_layer_stats()[0]["total_tokens"] == 0
    assert t.snapshot().lifetime_tokens.sum().item() == 29


def test_bad_ids_raise_with_culprit() -> None:
    t = ExpertActivationTracker()
    with pytest.raises(EnhancedError) as err:
        t.record_expert_activation(-1, 2)
    assert err.value.culprit == (-1, 2)
    with pytest.raises(EnhancedError) as err:
        t.record_expert_activation(1, 2, tokens_processed=-3)
    assert err.value.culprit == (1, 2)


def test_module_functions_use_global_tracker(global_tracker: ExpertActivationTracker, tmp_path: Path) -> None:
    assert get_global_expert_tracker() is global_tracker
    global_tracker.record_expert_activation(0, 1, 4)
    stats = api.get_expert_activation_stats()
    assert stats["expert_stats"]["layer_0_expert_1"]["total_tokens_processed"] == 4
    assert api.get_expert_activation_stats(layer_id=0, expert_id=1)["activation_count"] == 1
    out = tmp_path / "expert_stats.json"
    api.export_expert_activation_stats(out)
    assert json.loads(out.read_text())["layer_stats"]["0"]["total_tokens"] == 4
    api.reset_expert_activation_stats()
    assert api.get_expert_activation_stats()["layer_stats"]["0"]["total_tokens"] == 0


def test_module_functions_without_tracker() -> None:
    set_global_expert_tracker(None)
    assert get_global_expert_tracker() is None
    with pytest.raises(EnhancedError, match="not enabled"):
        api.get_expert_activation_stats()
    with pytest.raises(EnhancedError, match="not enabled"):
        api.reset_expert_activation_stats()
