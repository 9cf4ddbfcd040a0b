"""SGLang's own expert-location reader takes our export; the statistics exchange and its state folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sglang.srt.enhanced.moe_tracker.api import export_expert_activation_stats
from sglang.srt.enhanced.moe_tracker.exchange import StatsExchange, StatsQuery
from sglang.srt.enhanced.moe_tracker.export import format_for_path
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker, set_global_expert_tracker


def test_sglang_reads_our_expert_location_file(tiny_model_factory, tmp_path, sglang_expert_location) -> None:
    model_dir = tiny_model_factory("qwen2_moe")
    config = json.loads((model_dir / "config.json").read_text())
    layers, experts, top_k = config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]
    moe_layers = list(range(1, layers))  # layer 0 counted as dense: its row must be zero
    tracker = ExpertActivationTracker(layers, experts, top_k, max_tokens=8, layer_ids=moe_layers)
    gen = torch.Generator().manual_seed(3)
    expected = torch.zeros(layers, experts, dtype=torch.long)
    for tokens in (5, 3, 8):
        tracker.begin_pass(tokens, is_decode=tokens == 3)
        for layer in moe_layers:
            ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
            expected[layer] += torch.bincount(ids.reshape(-1), minlength=experts)
            tracker.record_routing(layer, ids.to(torch.int32))
        tracker.end_pass()
    set_global_expert_tracker(tracker)
    try:
        path = tmp_path / "load.sglang.json"
        assert format_for_path(path) == "sglang"
        export_expert_activation_stats(path)
    finally:
        set_global_expert_tracker(None)

    logical_count, metadata = sglang_expert_location(model_dir, path)
    assert logical_count == expected.tolist()
    assert tuple(metadata.physical_to_logical_map.shape) == (layers, experts)


def test_exchange_reads_only_answers_to_its_query(tmp_path: Path) -> None:
    exchange = StatsExchange(tmp_path)
    assert exchange.current_query() == (None, StatsQuery())
    tracker = ExpertActivationTracker(2, 4, 2, max_tokens=4)
    old = exchange.post_query(StatsQuery())
    exchange.write_answer(old, tracker.snapshot())
    query = StatsQuery(window=5, request_ids=None, coactivation_layers=(1,))
    new = exchange.post_query(query)
    assert exchange.current_query() == (new, query)
    assert exchange.answers(new) == []  # the answer on disk is to the older query
    tracker.begin_pass(1, is_decode=False)
    tracker.record_routing(0, torch.tensor([[0, 1]], dtype=torch.int32))
    tracker.record_routing(1, torch.tensor([[2, 3]], dtype=torch.int32))
    tracker.end_pass()
    exchange.write_answer(new, tracker.snapshot(window=query.window, coactivation_layers=query.coactivation_layers))
    (answer,) = exchange.answers(new)
    assert answer.tokens.sum().item() == 4 and answer.window["passes"] == 1
    assert answer.coactivation[1][2][3] == 1


def test_state_folder_goes_when_its_process_ends() -> None:
    script = ("from sglang.srt.enhanced.moe_tracker.exchange import create_state_folder\n"
              "import os\np = create_state_folder()\n(p / 'snapshot-1.json').write_text('{}')\n"
              "print(p, flush=True)\nos._exit(0)\n")  # no atexit: the watcher must remove it
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("sglang-enhanced-")
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists()


@pytest.mark.parametrize("flag", ["--expert-window-passes", "--expert-request-records"])
def test_negative_tracking_sizes_are_refused(flag: str, capsys) -> None:
    from sglang.srt.enhanced.launch import main

    assert main(["--model", "/nonexistent", "--enable-expert-tracking", flag, "-1"]) == 2
    assert flag in capsys.readouterr().err
