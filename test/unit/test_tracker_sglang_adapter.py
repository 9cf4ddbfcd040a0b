"""The tracking recorder inside SGLang's forward path and graph capture, on the CPU with the real tracker."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.enhanced.moe_tracker import sglang_adapter
from sglang.srt.enhanced.moe_tracker.sglang_adapter import (
    RequestSlots,
    TrackingRecorder,
    fold_in_captured_graphs,
)
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker
from sglang.srt.managers import expert_distribution
from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner
from sglang.srt.model_executor.forward_batch_info import ForwardMode

LAYERS, EXPERTS, TOP_K, POOL = 2, 5, 2, 6


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> TrackingRecorder:
    """A TrackingRecorder with per-request use as the SGLang global recorder (restored afterwards)."""
    tracker = ExpertActivationTracker(LAYERS, EXPERTS, TOP_K, max_tokens=16)
    rec = TrackingRecorder(expert_distribution.get_global_expert_distribution_recorder(), tracker, None)
    rec.slots = RequestSlots(rec, max_records=8)
    monkeypatch.setattr(expert_distribution, "_global_expert_distribution_recorder", rec)
    monkeypatch.setattr(sglang_adapter, "get_global_expert_distribution_recorder", lambda: rec)
    return rec


def _batch(mode: ForwardMode, slots: list[int], extend_lens: list[int] | None = None) -> SimpleNamespace:
    tokens = sum(extend_lens) if extend_lens else len(slots)
    lens = torch.tensor(extend_lens) if extend_lens else None
    return SimpleNamespace(
        input_ids=torch.zeros(tokens, dtype=torch.int64), forward_mode=mode,
        req_to_token_pool=SimpleNamespace(size=POOL), req_pool_indices=torch.tensor(slots),
        extend_seq_lens=lens, extend_seq_lens_cpu=extend_lens,
    )  # fmt: skip


def test_forward_passes_count_per_layer_phase_and_request_slot(recorder: TrackingRecorder) -> None:
    routed = {  # (pass, layer) -> ids [tokens, top_k]
        (0, 0): [[0, 1], [0, 2], [4, 3]], (0, 1): [[1, 2], [2, 3], [0, 1]],  # prefill: slot 3 x 2 tokens, slot 5 x 1
        (1, 0): [[4, 0], [1, 0]], (1, 1): [[3, 4], [3, 2]],  # decode: slots 5, 3
    }  # fmt: skip
    batches = [_batch(ForwardMode.EXTEND, [3, 5], extend_lens=[2, 1]), _batch(ForwardMode.DECODE, [5, 3])]
    for i, batch in enumerate(batches):
        with recorder.with_forward_pass(i, batch):
            for layer in range(LAYERS):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(torch.tensor(routed[i, layer], dtype=torch.int32))
    snap = recorder.snapshot()
    for phase, i in ((PREFILL, 0), (DECODE, 1)):
        for layer in range(LAYERS):
            want = torch.bincount(torch.tensor(routed[i, layer]).flatten(), minlength=EXPERTS)
            assert snap.tokens[phase, layer].tolist() == want.tolist()
    # Request slots: each token's ids land in its slot's row, whatever the pass.
    token_slots = {0: [3, 3, 5], 1: [5, 3]}
    want_slots = torch.zeros(POOL, LAYERS, EXPERTS, dtype=torch.int32)
    for (i, layer), ids in routed.items():
        for slot, row in zip(token_slots[i], ids, strict=True):
            for e in row:
                want_slots[slot, layer, e] += 1
    assert torch.equal(recorder.tracker.request_use.slot_counts, want_slots)


def test_graph_capture_is_wrapped_once_and_opens_folding_in_graphs(recorder, monkeypatch) -> None:
    seen = []

    def capture(runner) -> str:  # stands in for SGLang's CudaGraphRunner.capture
        seen.append(("capture", runner))
        return "captured"

    @contextmanager
    def folding_in_graphs(token_rows=None):
        seen.append(("folding", token_rows))
        yield

    monkeypatch.setattr(CudaGraphRunner, "capture", capture)
    monkeypatch.setattr(recorder.tracker, "folding_in_graphs", folding_in_graphs)
    fold_in_captured_graphs()
    wrapped = CudaGraphRunner.capture
    fold_in_captured_graphs()
    assert CudaGraphRunner.capture is wrapped is not capture

    slots = torch.arange(4, dtype=torch.int32)
    runner = SimpleNamespace(num_tokens_per_bs=1, req_pool_indices=slots,
                             model_runner=SimpleNamespace(req_to_token_pool=SimpleNamespace(size=POOL)))  # fmt: skip
    assert wrapped(runner) == "captured"
    assert seen == [("folding", slots), ("capture", runner)]
    # The per-slot counts were sized from the runner's pool before the capture.
    assert recorder.tracker.request_use.slot_counts.shape == (POOL, LAYERS, EXPERTS)

    seen.clear()  # several tokens per request in a graph (speculative decoding): no slots read
    wrapped(SimpleNamespace(**{**vars(runner), "num_tokens_per_bs": 2}))
    assert seen[0] == ("folding", None)

    seen.clear()  # tracking not installed in this process: the capture runs as SGLang's
    monkeypatch.setattr(sglang_adapter, "get_global_expert_distribution_recorder", lambda: object())
    wrapped(runner)
    assert seen == [("capture", runner)]
