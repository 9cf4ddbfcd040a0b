"""One-kernel fold of a staged pass: against hand-computed counts and the torch reference."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.counters import PassOutputs
from sglang.srt.enhanced.moe_tracker.fold_kernel import fold_pass, fold_pass_ref


def _totals(layers: int, experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(2, 2, 2, layers, experts, dtype=torch.int64, device=device),
            torch.zeros(layers, experts, dtype=torch.float64, device=device))


@pytest.mark.parametrize("fold", [fold_pass, fold_pass_ref], ids=["kernel", "reference"])
def test_hand_computed_pass(fold, device: torch.device) -> None:
    # 2 routing layers (of 3 total), 4 experts (of 5 total), top-2, 4 staged rows, 3 real tokens.
    staging = torch.tensor([
        [[0, 1], [0, 2], [3, -1], [1, 1]],
        [[2, 3], [2, 7], [-1, -1], [0, 0]],
    ], dtype=torch.int32, device=device)  # fmt: skip
    counts, last = _totals(3, 5, device)
    counts[1, 0, 1, 0, 0] = 10  # lifetime decode tokens of (0, 0) stay put and get added to
    last[1, 3] = 5.0
    fold(staging, 3, 4, counts, last, 1, 1_700_000_123.25, 4)
    tokens = [[2, 1, 1, 1, 0], [0, 0, 2, 1, 0], [0] * 5]
    active = [[1, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0] * 5]
    assert counts[0, 0, 1].tolist() == tokens
    assert counts[0, 1, 1].tolist() == active
    assert counts[1, 0, 1].tolist() == [[12, 1, 1, 1, 0], *tokens[1:]]
    assert counts[1, 1, 1].tolist() == active
    assert counts[:, :, 0].sum().item() == 0  # the other phase is untouched
    t = 1_700_000_123.25
    assert last.tolist() == [[t, t, t, t, 0.0], [0.0, 0.0, t, t, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert torch.all(staging == -1)


@pytest.mark.parametrize(
    ("layers", "rows", "top_k", "experts", "num_tokens", "clear_rows"),
    [(3, 5, 2, 6, 5, 5), (4, 37, 3, 129, 30, 37), (1, 8, 1, 1, 0, 3),
     # above SPLIT_ABOVE_ROWS: blocks of rows per layer, the last ones only clearing padding rows
     (2, 600, 8, 60, 513, 520), (2, 640, 2, 16, 100, 600)],
)
def test_kernel_matches_reference(device, layers, rows, top_k, experts, num_tokens, clear_rows) -> None:
    gen = torch.Generator().manual_seed(layers * 1000 + rows)
    staging = torch.randint(-1, experts + 2, (layers, rows, top_k), generator=gen, dtype=torch.int32)
    start = torch.randint(0, 50, (2, 2, 2, layers + 1, experts + 3), generator=gen)
    results = []
    for fold in (fold_pass, fold_pass_ref):
        buf = staging.clone().to(device)
        counts, last = _totals(layers + 1, experts + 3, device)
        counts += start.to(device)
        for i, now in enumerate((100.5, 200.75)):
            fold(buf if i == 0 else staging.clone().to(device), num_tokens, clear_rows, counts, last, i % 2, now,
                 experts)
        results.append((buf.cpu(), counts.cpu(), last.cpu()))
    (buf_k, counts_k, last_k), (buf_r, counts_r, last_r) = results
    assert torch.equal(buf_k, buf_r)
    assert torch.equal(counts_k, counts_r)
    assert torch.equal(last_k, last_r)


def test_bad_layouts_raise(device: torch.device) -> None:
    counts, last = _totals(2, 4, device)
    with pytest.raises(EnhancedError) as e:
        fold_pass(torch.zeros(2, 4, 2, dtype=torch.int64, device=device), 1, 1, counts, last, 0, 0.0, 4)
    assert e.value.culprit == "staging"
    with pytest.raises(EnhancedError) as e:
        fold_pass(torch.zeros(3, 4, 2, dtype=torch.int32, device=device), 1, 1, counts, last, 0, 0.0, 4)
    assert e.value.culprit == "counts"


def test_counters_fold_paths_agree(device: torch.device) -> None:
    """ExpertCounters count the same passes with every fold implementation."""
    from sglang.srt.enhanced.moe_tracker.counters import ExpertCounters

    gen = torch.Generator().manual_seed(7)
    layers, experts, top_k = 3, 5, 2
    impls = ["triton", "torch"] + (["numpy"] if device.type == "cpu" else [])
    counters = {impl: ExpertCounters(layers, experts, top_k, max_tokens=6, device=device, fold_impl=impl)
                for impl in impls}
    valid = 0
    for step, (padded, real) in enumerate([(4, 3), (6, 6), (9, 7), (2, 0), (5, 5)]):  # 9 rows: overflow buffer
        routing = torch.randint(-1, experts + 1, (layers, padded, top_k), generator=gen, dtype=torch.int32)
        valid += int(((routing[:, :real] >= 0) & (routing[:, :real] < experts)).sum())
        for c in counters.values():
            c.select(padded)
            for layer in range(layers):
                c.record(layer, routing[layer].to(device))
            c.fold(real, step % 2, 10.0 + step, clear_rows=padded)
    first = counters["triton"].to_cpu()
    assert first["tokens"].sum().item() == valid
    for impl, c in counters.items():
        got = c.to_cpu()
        for name in ("tokens", "activations", "lifetime_tokens", "lifetime_activations", "last_activation_time"):
            assert torch.equal(got[name], first[name]), (impl, name)
        assert torch.all(c.staged() == -1), impl


def test_fold_impl_is_checked(device: torch.device) -> None:
    from sglang.srt.enhanced.moe_tracker.counters import ExpertCounters

    with pytest.raises(EnhancedError) as e:
        ExpertCounters(1, 2, 1, max_tokens=2, device=device, fold_impl="cuda-graph")
    assert e.value.culprit == "fold_impl"


def _outputs(layers: int, experts: int, slots: int, rows: torch.Tensor, device: torch.device) -> PassOutputs:
    return PassOutputs(
        ring=torch.zeros(3, layers, experts, dtype=torch.int32, device=device), ring_slot=1,
        request_counts=torch.zeros(slots, layers, experts, dtype=torch.int32, device=device),
        token_rows=rows.to(device),
        coactivation=torch.zeros(layers, experts, experts, dtype=torch.int64, device=device),
    )


@pytest.mark.parametrize("fold", [fold_pass, fold_pass_ref], ids=["kernel", "reference"])
def test_hand_computed_ring_requests_and_pairs(fold, device: torch.device) -> None:
    staging = torch.tensor([
        [[0, 1], [0, 2], [3, -1], [1, 1]],
        [[2, 3], [2, 7], [-1, -1], [0, 0]],
    ], dtype=torch.int32, device=device)  # fmt: skip
    counts, last = _totals(2, 4, device)
    # Tokens 0 and 2 belong to request slot 1, token 1 to slot 0; row 3 is padding.
    out = _outputs(2, 4, 2, torch.tensor([1, 0, 1, 0]), device)
    fold(staging, 3, 4, counts, last, 0, 5.0, 4, out)
    assert out.ring[1].tolist() == [[2, 1, 1, 1], [0, 0, 2, 1]]
    assert out.ring[0].sum().item() == 0 and out.ring[2].sum().item() == 0
    assert out.request_counts[1].tolist() == [[1, 1, 0, 1], [0, 0, 1, 1]]
    assert out.request_counts[0].tolist() == [[1, 0, 1, 0], [0, 0, 1, 0]]
    pairs = torch.zeros(2, 4, 4, dtype=torch.int64)
    pairs[0, 0, 1] = pairs[0, 0, 2] = pairs[1, 2, 3] = 1  # (2, 7): 7 is out of range
    assert torch.equal(out.coactivation.cpu(), pairs)


def _random_pass(layers: int, rows: int, top_k: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Staged ids (distinct per row, -1 = padding slot) and request slots (-1 = none, else 0-4) of a random pass."""
    gen = torch.Generator().manual_seed(seed)
    staging = torch.stack([torch.stack([torch.randperm(experts + 1, generator=gen)[:top_k] - 1
                                        for _ in range(rows)]) for _ in range(layers)]).to(torch.int32)
    return staging, torch.randint(-1, 5, (rows,), generator=gen)


@pytest.mark.parametrize(("layers", "rows", "top_k", "experts", "num_tokens"),
                         [(2, 9, 2, 6, 9), (3, 40, 4, 33, 37), (1, 300, 8, 64, 290), (2, 700, 4, 20, 650)])
def test_kernel_outputs_match_reference(device, layers, rows, top_k, experts, num_tokens) -> None:
    staging, token_rows = _random_pass(layers, rows, top_k, experts, seed=rows)
    results = []
    for fold in (fold_pass, fold_pass_ref):
        counts, last = _totals(layers, experts, device)
        out = _outputs(layers, experts, 5, token_rows, device)
        fold(staging.clone().to(device), num_tokens, rows, counts, last, 1, 3.0, experts, out)
        results.append([t.cpu() for t in (counts, out.ring, out.request_counts, out.coactivation)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def _compiled_variants() -> int:
    from sglang.srt.enhanced.moe_tracker import fold_kernel

    kernels = (fold_kernel._fold_pass_kernel, fold_kernel._fold_totals_kernel)  # noqa: SLF001
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernels (none under the interpreter)")
def test_no_pass_compiles_after_warm_up(device: torch.device) -> None:
    """After warm_up, passes of any size (decode, prefill, split) reuse compiled kernels, and count right."""
    from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

    layers, experts, top_k = 3, 24, 4
    tracker = ExpertActivationTracker(layers, experts, top_k, max_tokens=64, device=device, window_passes=8)
    tracker.enable_request_use(4)
    tracker.warm_up()
    compiled = _compiled_variants()
    gen = torch.Generator().manual_seed(3)
    routed = torch.zeros(layers, experts, dtype=torch.int64)
    for tokens in (1, 3, 17, 64, 100, 300, 1000):
        tracker.begin_pass(tokens, is_decode=tokens <= 64,
                           token_rows=torch.randint(-1, 4, (tokens,), generator=gen).to(device))  # fmt: skip
        for layer in range(layers):
            ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
            routed[layer] += torch.bincount(ids.flatten(), minlength=experts)
            tracker.record_routing(layer, ids.to(torch.int32).to(device))
        tracker.end_pass()
    assert _compiled_variants() == compiled
    assert torch.equal(tracker.snapshot().tokens.sum(dim=0), routed)


@pytest.mark.parametrize(("layers", "rows", "top_k", "experts", "num_tokens", "slot_dtype"),
                         [(2, 9, 2, 6, 7, torch.int32), (3, 40, 4, 33, 40, torch.int64), (1, 300, 8, 64, 290, torch.int32)])
def test_params_fold_matches_reference(device, layers, rows, top_k, experts, num_tokens, slot_dtype) -> None:
    """The fold a CUDA graph holds, its pass values read from a device tensor, counts as the reference."""
    from sglang.srt.enhanced.moe_tracker.fold_kernel import encode_pass_params, fold_pass_from_params

    staging, token_rows = _random_pass(layers, rows, top_k, experts, seed=rows + 1)
    results = []
    for use_params in (True, False):
        counts, last = _totals(layers, experts, device)
        out = _outputs(layers, experts, 5, token_rows, device)
        for phase, now, ring_slot in ((1, 1_700_000_003.5, 2), (0, 1_700_000_009.75, 0)):
            out.ring_slot = ring_slot
            buf = staging.clone().to(device)
            if use_params:
                out.token_rows = token_rows.to(slot_dtype).to(device)
                values = encode_pass_params(num_tokens, phase, now, ring_slot, counts, layers, experts)
                params = torch.tensor(values, dtype=torch.int64, device=device)
                fold_pass_from_params(buf, rows, counts, last, params, experts, out)
            else:
                fold_pass_ref(buf, num_tokens, rows, counts, last, phase, now, experts, out)
            assert torch.all(buf == -1)
        results.append([t.cpu() for t in (counts, last, out.ring, out.request_counts, out.coactivation)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_params_fold_checks_its_params(device: torch.device) -> None:
    from sglang.srt.enhanced.moe_tracker.fold_kernel import fold_pass_from_params

    counts, last = _totals(1, 4, device)
    staging = torch.zeros(1, 4, 2, dtype=torch.int32, device=device)
    with pytest.raises(EnhancedError) as e:
        fold_pass_from_params(staging, 4, counts, last, torch.zeros(5, dtype=torch.int32, device=device), 4)
    assert e.value.culprit == "params"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_graphs_fold_their_own_replays(device: torch.device) -> None:
    """Graphs captured inside folding_in_graphs count each replay once (end_pass launches nothing for
    them), read the request slots of the graph's input, fill the window; eager passes fold as before."""
    from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

    layers, experts, top_k, graph_rows, slots = 3, 40, 4, 8, 6
    tracked = ExpertActivationTracker(layers, experts, top_k, max_tokens=64, device=device, window_passes=4)
    tracked.enable_request_use(slots)
    tracked.warm_up()
    ids_in = torch.zeros(layers, graph_rows, top_k, dtype=torch.int32, device=device)
    slot_in = torch.zeros(graph_rows, dtype=torch.int32, device=device)

    def record_all() -> None:
        for layer in range(layers):
            tracked.record_routing(layer, ids_in[layer] + 0)  # a new tensor per layer, as a router makes

    with tracked.folding_in_graphs(slot_in):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            record_all()  # warm-up outside capture, as SGLang does
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            record_all()
    gen = torch.Generator().manual_seed(11)
    want_tokens = torch.zeros(2, layers, experts, dtype=torch.int64)
    want_slots = torch.zeros(slots, layers, experts, dtype=torch.int32)
    last_pass = None
    for tokens in (1, 5, 8, 3, 20, 2):
        ids = torch.stack([torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
                           for _ in range(layers)]).to(torch.int32)  # fmt: skip
        rows = torch.randint(0, slots, (tokens,), generator=gen)
        phase = 1 if tokens <= graph_rows else 0
        for layer in range(layers):
            want_tokens[phase, layer] += torch.bincount(ids[layer].flatten().long(), minlength=experts)
            for t in range(tokens):
                want_slots[rows[t], layer].index_add_(0, ids[layer, t].long(), torch.ones(top_k, dtype=torch.int32))
        tracked.begin_pass(tokens, is_decode=phase == 1, token_rows=rows.to(device))
        if tokens <= graph_rows:  # replay: padding rows hold stale ids and slots, never counted
            ids_in.random_(0, experts)
            slot_in.random_(0, slots)
            ids_in[:, :tokens] = ids.to(device)
            slot_in[:tokens] = rows.to(torch.int32).to(device)
            graph.replay()
        else:
            for layer in range(layers):
                tracked.record_routing(layer, ids[layer].to(device))
        tracked.end_pass()
        last_pass = (phase, ids)
    assert tracked._counters.graph_folds  # noqa: SLF001
    snap = tracked.snapshot()
    assert torch.equal(snap.tokens, want_tokens)
    assert torch.equal(tracked.request_use.slot_counts.cpu(), want_slots)
    window = tracked.snapshot(window=1)
    phase, ids = last_pass
    assert torch.equal(window.tokens[phase], torch.stack([torch.bincount(x.flatten().long(), minlength=experts)
                                                          for x in ids]))  # fmt: skip
    assert tracked.snapshot(window=4).tokens.sum().item() == (8 + 3 + 20 + 2) * layers * top_k
