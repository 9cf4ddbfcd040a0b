"""Windows of recent passes, per-request expert use and co-activation against hand-computed counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import (
    coactivation_stats,
    expert_activation_stats,
    request_expert_use,
)
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

LAYERS, EXPERTS, TOP_K = 3, 6, 2


def make(fold_impl: str, **kw) -> ExpertActivationTracker:
    t = ExpertActivationTracker(LAYERS, EXPERTS, TOP_K, max_tokens=16, layer_ids=[1, 2], **kw)
    t._counters.fold_impl = fold_impl  # noqa: SLF001 - both CPU implementations are checked
    return t


def run_pass(t: ExpertActivationTracker, routed: list[list[int]], rows: list[int] | None = None,
             decode: bool = False) -> None:
    """One pass in which both MoE layers route ``routed`` (layer 2 with ids mirrored)."""
    token_rows = None if rows is None else torch.tensor(rows, dtype=torch.int64)
    t.begin_pass(len(routed), is_decode=decode, token_rows=token_rows)
    t.record_routing(1, torch.tensor(routed, dtype=torch.int32))
    t.record_routing(2, torch.tensor([[EXPERTS - 1 - e for e in r] for r in routed], dtype=torch.int32))
    t.end_pass()


def hist(routed: list[list[int]], layer: int) -> list[int]:
    counts = Counter(e if layer == 1 else EXPERTS - 1 - e for r in routed for e in r)
    return [counts[e] for e in range(EXPERTS)]


IMPLS = ["numpy", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
def test_passes_that_count_nothing_leave_the_window(impl: str) -> None:
    """A pass ended with no tokens, or aborted, gives its ring slot back: the window still ends with
    the last real passes, in order."""
    t = make(impl, window_passes=2)
    first, second = [[0, 1]], [[2, 3], [4, 5]]
    run_pass(t, first)
    t.begin_pass(1, is_decode=True)
    t.record_routing(1, torch.tensor([[5, 4]], dtype=torch.int32))
    t.end_pass(0)
    t.begin_pass(2, is_decode=False)
    t.abort_pass()
    run_pass(t, second)
    snap = t.snapshot(window=2)
    assert snap.window["passes"] == 2 and snap.num_passes == {"prefill": 2, "decode": 0}
    assert snap.tokens[0, 1].tolist() == [a + b for a, b in zip(hist(first, 1), hist(second, 1), strict=True)]
    assert t.snapshot(window=1).tokens[0, 1].tolist() == hist(second, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_window_holds_the_last_passes(impl: str) -> None:
    t = make(impl, window_passes=3)
    passes = [[[0, 1]], [[1, 2], [2, 3]], [[4, 5]], [[0, 5], [1, 4], [2, 3]]]
    for i, routed in enumerate(passes):
        run_pass(t, routed, decode=i % 2 == 1)
    for window, kept in ((1, passes[3:]), (2, passes[2:]), (3, passes[1:]), (50, passes[1:])):
        snap = t.snapshot(window=window)
        assert snap.window == {"requested": window, "passes": len(kept), "capacity": 3}
        for layer in (1, 2):
            want = [sum(x) for x in zip(*(hist(p, layer) for p in kept), strict=True)]
            assert (snap.tokens[0, layer] + snap.tokens[1, layer]).tolist() == want
            active = [sum(1 for p in kept if hist(p, layer)[e] > 0) for e in range(EXPERTS)]
            assert (snap.activations[0, layer] + snap.activations[1, layer]).tolist() == active
        decode_passes = sum(1 for p in kept if passes.index(p) % 2 == 1)
        assert snap.num_passes == {"prefill": len(kept) - decode_passes, "decode": decode_passes}
        assert snap.lifetime_tokens.sum().item() == 2 * TOP_K * sum(len(p) for p in passes)
    t.reset_stats()  # a reset leaves the window alone
    assert t.snapshot(window=1).tokens.sum().item() == 2 * TOP_K * len(passes[3])
    stats = expert_activation_stats(t.snapshot(window=2))
    assert stats["summary"]["window"]["passes"] == 2
    with pytest.raises(EnhancedError) as e:
        t.snapshot(window=0)
    assert e.value.culprit == "window"
    with pytest.raises(EnhancedError):
        make(impl, window_passes=0).snapshot(window=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_request_use_follows_slots(impl: str) -> None:
    t = make(impl, coactivation=False)
    t.enable_request_use(num_slots=4, max_records=3)
    # Pass 1 (prefill): request "a" in slot 2 (2 tokens), "b" in slot 0 (1 token); row 3 is unrelated.
    run_pass(t, [[0, 1], [1, 2], [3, 4]], rows=[2, 2, 0])
    # "a"'s next chunk moves it to slot 1; "b" decodes one token.
    t.release_request_slot(2, "a", finished=False)
    run_pass(t, [[5, 0], [2, 3]], rows=[1, 0], decode=True)
    t.release_request_slot(1, "a", finished=True)
    t.release_request_slot(0, "b", finished=True)
    snap = t.snapshot(request_ids=None)
    a = request_expert_use(snap, "a")
    a_routed = [[0, 1], [1, 2], [5, 0]]
    for layer in (1, 2):
        want = {str(e): n for e, n in enumerate(hist(a_routed, layer)) if n}
        assert a["layers"][str(layer)] == {"experts": want, "distinct_experts": len(want), "tokens": 6}
    assert a["tokens_routed"] == 12 and a["expert_activations"] == 8
    records = {r["request_id"]: r for r in snap.requests}
    assert records["b"]["tokens_routed"] == 8 and records["b"]["expert_activations"] == 6
    # A slot's counts are gone once released: a new owner starts from zero.
    run_pass(t, [[4, 4]], rows=[1])
    t.release_request_slot(1, "c", finished=True)
    assert t.snapshot(request_ids=["c"]).request_experts == {"c": [[1, 4, 2], [2, 1, 2]]}
    # Only three records are kept, oldest out first.
    run_pass(t, [[3, 5]], rows=[3])
    t.release_request_slot(3, "d", finished=True)
    assert [r["request_id"] for r in t.snapshot().requests] == ["b", "c", "d"]
    with pytest.raises(EnhancedError) as e:
        request_expert_use(t.snapshot(request_ids=["a"]), "a")
    assert e.value.culprit == "a"
    t.reset_stats()
    assert t.snapshot(request_ids=None).requests == []


def test_request_use_adds_to_host_records() -> None:
    t = make("numpy")
    t.enable_request_use(num_slots=2)
    t.record_request("r", 2, 1)
    run_pass(t, [[0, 1], [2, 3]], rows=[1, 1])
    t.release_request_slot(1, "r", finished=True)
    (record,) = t.snapshot().requests
    assert record["input_length"] == 2 and record["tokens_routed"] == 8 and record["expert_activations"] == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_coactivation_counts_pairs(impl: str) -> None:
    t = make(impl)
    rng = random.Random(7)
    passes = [[rng.sample(range(EXPERTS), TOP_K) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    for routed in passes:
        run_pass(t, routed)
    snap = t.snapshot(coactivation_layers=[1, 2])
    for layer in (1, 2):
        want = [[0] * EXPERTS for _ in range(EXPERTS)]
        for routed in passes:
            for a, b in routed:
                a, b = (a, b) if layer == 1 else (EXPERTS - 1 - a, EXPERTS - 1 - b)
                want[a][b] += 1
                want[b][a] += 1
                want[a][a] += 1
                want[b][b] += 1
        assert coactivation_stats(snap, layer)["counts"] == want
    assert t.snapshot(coactivation_layers=[0, 7]).coactivation == {}  # a dense layer, no layer
    t.reset_stats()
    assert torch.tensor(t.snapshot(coactivation_layers=[1]).coactivation[1]).sum().item() == 0
    with pytest.raises(EnhancedError) as e:
        coactivation_stats(make(impl, coactivation=False).snapshot(coactivation_layers=[1]), 1)
    assert e.value.culprit == (1, None)


def test_snapshot_round_trip_and_merge_keep_the_extras() -> None:
    t = make("numpy")
    t.enable_request_use(num_slots=2)
    run_pass(t, [[0, 1]], rows=[0])
    t.release_request_slot(0, "x", finished=True)
    snap = t.snapshot(window=1, request_ids=None, coactivation_layers=[1])
    back = TrackerSnapshot.from_dict(snap.to_dict())
    assert back.request_experts == snap.request_experts and back.coactivation == snap.coactivation
    assert back.window == snap.window
    merged = TrackerSnapshot.merge([back, back])
    assert merged.request_experts["x"] == [[layer, e, 2 * n] for layer, e, n in snap.request_experts["x"]]
    assert merged.coactivation[1][0][1] == 2
    assert merged.window["passes"] == 2
    (record,) = merged.requests
    assert record["tokens_routed"] == 2 * snap.requests[0]["tokens_routed"]
