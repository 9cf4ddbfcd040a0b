"""Served expert counts equal those of a transformers forward pass of the same weights.

Each architecture is served on CPU in float32 (so near-ties don't flip) with expert
tracking; prompts are sent as token ids with one output token (prefill only). The
reference routes the same ids through the transformers model and takes each
layer's top-k from its router, outside any code of ours.
"""

from __future__ import annotations

import pytest
import requests
import torch

from .hf_reference import RouterReference
from .server import start_enhanced

pytestmark = pytest.mark.e2e

# DeepSeek-V2/V3: SGLang 0.4.7 refuses MLA on CPU without the intel_amx backend (a compiled
# sgl-kernel), so its MoE layer is checked in-process in test_tracking_deepseek.py instead.
ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]
PROMPTS = [
    [5, 17, 42, 99, 123, 7, 300, 11],
    [250, 3, 64, 64, 128, 256, 31, 400, 12, 9, 77],
    [401, 8, 150, 222, 19],
]


def reference_counts(model_dir, prompts: list[list[int]]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per MoE layer: tokens per expert and prompts in which each expert got a token."""
    ref = RouterReference(model_dir)
    tokens: dict[int, torch.Tensor] = {}
    active: dict[int, torch.Tensor] = {}
    for ids in prompts:
        for i, hist in ref.tokens(ids).items():
            tokens[i] = tokens.get(i, torch.zeros(ref.num_experts, dtype=torch.long)) + hist
            active[i] = active.get(i, torch.zeros(ref.num_experts, dtype=torch.long)) + (hist > 0).long()
    return tokens, active


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tiny_model_factory, tmp_path_factory):
    arch = request.param
    model_dir = tiny_model_factory(arch, dtype=torch.float32)
    log_dir = tmp_path_factory.mktemp(f"logs-{arch}")
    server = start_enhanced(model_dir, log_dir, "--dtype", "float32", "--enable-expert-tracking",
                            "--disable-radix-cache", "--disable-overlap-schedule", name=arch)
    with server:
        server.wait_ready()
        yield arch, model_dir, server


def test_prefill_counts_match_transformers(served):
    arch, model_dir, server = served
    r = requests.post(server.base_url + "/expert_stats/reset", timeout=60)
    assert r.status_code == 200
    for ids in PROMPTS:
        out = requests.post(server.base_url + "/generate", json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, timeout=120)
        assert out.status_code == 200, out.text
    stats = requests.get(server.base_url + "/expert_stats", timeout=60).json()

    ref_tokens, ref_active = reference_counts(model_dir, PROMPTS)
    assert sorted(int(k) for k in stats["layer_stats"]) == sorted(ref_tokens), arch
    for layer, expected in ref_tokens.items():
        experts = stats["layer_stats"][str(layer)]["experts"]
        got = [experts[str(e)]["prefill_tokens"] for e in range(len(expected))]
        assert got == expected.tolist(), f"{arch} layer {layer}"
        got_active = [experts[str(e)]["prefill_activations"] for e in range(len(expected))]
        assert got_active == ref_active[layer].tolist(), f"{arch} layer {layer}"
        top_k = stats["summary"]["top_k"]
        assert stats["layer_stats"][str(layer)]["total_tokens"] == top_k * sum(len(p) for p in PROMPTS)
    recorded = {r["request_id"]: r for r in stats["requests"]}
    assert sorted(r["input_length"] for r in recorded.values()) == sorted(len(p) for p in PROMPTS)
    assert all(r["output_length"] == 1 for r in recorded.values())
