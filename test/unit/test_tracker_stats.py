"""Statistics built from snapshots: the documented structure, filters and balance numbers."""

from __future__ import annotations

import math

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker import tracker as tracker_mod
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats, load_balance
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

SEED_EXPERT_KEYS = {
    "layer_id",
    "expert_id",
    "activation_count",
    "last_activation_time",
    "total_tokens_processed",
}
SEED_LAYER_KEYS = {"total_experts", "total_activations", "total_tokens", "experts"}
SEED_TOP_KEYS = {"layer_id", "expert_id", "activation_count", "total_tokens_processed"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def snapshot(monkeypatch: pytest.MonkeyPatch) -> TrackerSnapshot:
    """Layers 1 and 2 of 3 are MoE (4 experts, top-2); layer 0 is dense."""
    clock = FakeClock()
    monkeypatch.setattr(tracker_mod, "time", clock)
    t = ExpertActivationTracker(3, 4, 2, max_tokens=8, layer_ids=[1, 2])
    t.begin_pass(4, is_decode=False)
    t.record_routing(1, torch.tensor([[0, 1], [0, 1], [0, 2], [0, -1]]))
    t.record_routing(2, torch.tensor([[3, 2], [3, 2], [3, 2], [3, 2]]))
    t.end_pass()
    clock.now = 600.0
    t.begin_pass(2, is_decode=True)
    t.record_routing(1, torch.tensor([[0, 1], [1, 0]]))
    t.record_routing(2, torch.tensor([[3, 1], [3, 1]]))
    t.end_pass()
    t.record_request("req-1", 4, 1)
    return t.snapshot()


def test_structure_has_seed_keys_and_all_experts(snapshot: TrackerSnapshot) -> None:
    stats = expert_activation_stats(snapshot)
    assert {"expert_stats", "layer_stats", "top_experts", "requests", "summary"} <= set(stats)
    assert sorted(stats["expert_stats"]) == sorted(
        f"layer_{lay}_expert_{e}" for lay in (1, 2) for e in range(4)
    )
    for entry in stats["expert_stats"].values():
        assert SEED_EXPERT_KEYS <= set(entry)
    assert set(stats["layer_stats"]) == {"1", "2"}
    for layer in stats["layer_stats"].values():
        assert SEED_LAYER_KEYS <= set(layer)
        assert layer["total_experts"] == 4
        assert set(layer["experts"]) == {"0", "1", "2", "3"}
        for e in layer["experts"].values():
            assert {"activation_count", "total_tokens_processed"} <= set(e)
    for entry in stats["top_experts"]:
        assert SEED_TOP_KEYS <= set(entry)

    # Hand counts. Layer 1: prefill e0=4, e1=2, e2=1; decode e0=2, e1=2.
    e10 = stats["expert_stats"]["layer_1_expert_0"]
    assert (e10["activation_count"], e10["total_tokens_processed"], e10["last_activation_time"]) == (
        2,
        6,
        600.0,
    )
    assert (e10["prefill_tokens"], e10["decode_tokens"]) == (4, 2)
    assert (e10["prefill_activations"], e10["decode_activations"]) == (1, 1)
    e12 = stats["expert_stats"]["layer_1_expert_2"]
    assert (e12["activation_count"], e12["total_tokens_processed"], e12["last_activation_time"]) == (
        1,
        1,
        500.0,
    )
    never = stats["expert_stats"]["layer_1_expert_3"]
    assert (never["activation_count"], never["total_tokens_processed"], never["last_activation_time"]) == (
        0,
        0,
        None,
    )
    l1 = stats["layer_stats"]["1"]
    assert (l1["total_tokens"], l1["total_activations"], l1["active_experts"]) == (11, 5, 3)
    assert (l1["prefill_tokens"], l1["decode_tokens"]) == (7, 4)
    # Layer 2 gets tokens x top_k = 6 x 2 routed tokens.
    l2 = stats["layer_stats"]["2"]
    assert l2["total_tokens"] == 12
    assert {k: v["total_tokens_processed"] for k, v in l2["experts"].items()} == {
        "0": 0,
        "1": 2,
        "2": 4,
        "3": 6,
    }

    assert [(e["layer_id"], e["expert_id"], e["total_tokens_processed"]) for e in stats["top_experts"]] == [
        (1, 0, 6),
        (2, 3, 6),
        (1, 1, 4),
        (2, 2, 4),
        (2, 1, 2),
        (1, 2, 1),
    ]
    assert stats["requests"][0]["request_id"] == "req-1"
    summary = stats["summary"]
    assert summary["num_layers"] == 2 and summary["num_experts"] == 4 and summary["layer_ids"] == [1, 2]
    assert (summary["total_passes"], summary["prefill_passes"], summary["decode_passes"]) == (2, 1, 1)
    assert (summary["total_tokens"], summary["prefill_tokens"], summary["decode_tokens"]) == (23, 15, 8)
    assert summary["tracking_since"] == 500.0
    assert expert_activation_stats(snapshot, top_k=2)["top_experts"] == stats["top_experts"][:2]


def test_load_balance_matches_hand_computation(snapshot: TrackerSnapshot) -> None:
    lb = expert_activation_stats(snapshot)["layer_stats"]["1"]["load_balance"]
    tokens, mean = [6, 4, 1, 0], 11 / 4
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / 4)
    entropy = -sum(t / 11 * math.log(t / 11) for t in tokens if t)
    assert lb["max_over_mean"] == pytest.approx(6 / mean)
    assert lb["coefficient_of_variation"] == pytest.approx(std / mean)
    assert lb["normalized_entropy"] == pytest.approx(entropy / math.log(4))
    even = {"max_over_mean": 1.0, "coefficient_of_variation": 0.0, "normalized_entropy": 1.0}
    assert load_balance([3, 3, 3]) == pytest.approx(even)
    one_takes_all = {"max_over_mean": 2.0, "coefficient_of_variation": 1.0, "normalized_entropy": 0.0}
    assert load_balance([0, 5]) == pytest.approx(one_takes_all)
    assert load_balance([0, 0]) == {
        "max_over_mean": None,
        "coefficient_of_variation": None,
        "normalized_entropy": None,
    }


def test_filters(snapshot: TrackerSnapshot) -> None:
    full = expert_activation_stats(snapshot)
    only2 = expert_activation_stats(snapshot, layer_id=2)
    assert set(only2["layer_stats"]) == {"2"}
    assert only2["layer_stats"]["2"] == full["layer_stats"]["2"]
    assert sorted(only2["expert_stats"]) == [f"layer_2_expert_{e}" for e in range(4)]
    assert {e["layer_id"] for e in only2["top_experts"]} == {2}
    assert (
        expert_activation_stats(snapshot, layer_id=1, expert_id=1) == full["expert_stats"]["layer_1_expert_1"]
    )


@pytest.mark.parametrize(
    ("layer_id", "expert_id"),
    [(0, None), (7, None), (1, 4), (1, -1), (None, 2)],
    ids=["dense-layer", "unknown-layer", "unknown-expert", "negative-expert", "expert-without-layer"],
)
def test_bad_filters_name_the_culprit(
    snapshot: TrackerSnapshot, layer_id: int | None, expert_id: int | None
) -> None:
    with pytest.raises(EnhancedError) as err:
        expert_activation_stats(snapshot, layer_id=layer_id, expert_id=expert_id)
    assert err.value.culprit == (layer_id, expert_id)
