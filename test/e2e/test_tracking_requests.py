"""Per-request expert use, co-activation, windows and SGLang's expert-location export of a server.

One tiny Qwen2-MoE server on CPU in float32 with tracking, radix cache and overlap scheduler
off, so every token a request routes is forwarded exactly once: its prompt in prefill, then
every generated token but the last one in decode. The reference routes the same token ids
through the transformers model.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from .hf_reference import RouterReference
from .server import start_enhanced

pytestmark = pytest.mark.e2e

# (prompt ids, max_new_tokens): prefill-only and decoding requests, sent together.
REQUESTS = [
    ([5, 17, 42, 99, 123, 7, 300, 11], 1),
    ([250, 3, 64, 64, 128, 256, 31, 400, 12, 9, 77], 6),
    ([401, 8, 150, 222, 19], 4),
    ([33, 34, 35], 1),
    ([77, 301, 2, 9, 180, 18, 44], 5),
    ([12, 240, 56], 3),
]


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("qwen2_moe", dtype=torch.float32)
    server = start_enhanced(model_dir, tmp_path_factory.mktemp("logs-requests"), "--dtype", "float32",
                            "--enable-expert-tracking", "--disable-radix-cache", "--disable-overlap-schedule",
                            "--expert-window-passes", "16", name="requests")
    with server:
        server.wait_ready(timeout=600)
        yield model_dir, server


@pytest.fixture(scope="module")
def reference(served):
    return RouterReference(served[0])


def generate(server, ids: list[int], max_new_tokens: int) -> dict:
    r = requests.post(server.base_url + "/generate", json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                              "ignore_eos": True},
        "return_logprob": True}, timeout=180)  # the logprobs name the generated token ids
    assert r.status_code == 200, r.text
    out = r.json()
    out["output_ids"] = [token for _, token, _ in out["meta_info"]["output_token_logprobs"]]
    assert len(out["output_ids"]) == max_new_tokens
    return out


def forwarded(ids: list[int], out: dict) -> list[int]:
    """The tokens a request routed: its prompt and every generated token but the last."""
    return ids + out["output_ids"][:-1]


def get(server, path: str, **params) -> requests.Response:
    return requests.get(server.base_url + path, params=params, timeout=120)


@pytest.fixture(scope="module")
def concurrent_run(served):
    _, server = served
    assert requests.post(server.base_url + "/expert_stats/reset", timeout=60).status_code == 200
    with ThreadPoolExecutor(max_workers=len(REQUESTS)) as pool:
        outs = list(pool.map(lambda req: generate(server, *req), REQUESTS))
    return [(forwarded(ids, out), out) for (ids, _), out in zip(REQUESTS, outs, strict=True)]


def test_each_request_routes_what_transformers_routes(served, reference, concurrent_run):
    _, server = served
    stats = get(server, "/expert_stats").json()
    records = {r["request_id"]: r for r in stats["requests"]}
    for tokens, out in concurrent_run:
        rid = out["meta_info"]["id"]
        r = get(server, f"/expert_stats/requests/{rid}")
        assert r.status_code == 200, r.text
        use = r.json()
        expected = reference.tokens(tokens)
        assert sorted(int(k) for k in use["layers"]) == sorted(expected)
        for layer, hist in expected.items():
            got = use["layers"][str(layer)]
            want = {str(e): int(t) for e, t in enumerate(hist.tolist()) if t > 0}
            assert got["experts"] == want, (rid, layer)
            assert got["distinct_experts"] == len(want)
            assert got["tokens"] == reference.top_k * len(tokens)
        distinct = sum(int((h > 0).sum()) for h in expected.values())
        assert use["expert_activations"] == distinct
        assert use["tokens_routed"] == reference.top_k * len(tokens) * len(expected)
        assert records[rid]["tokens_routed"] == use["tokens_routed"]
        assert records[rid]["expert_activations"] == distinct
        assert records[rid]["input_length"] == use["input_length"] == len(tokens) - len(out["output_ids"]) + 1


def test_json_export_holds_every_request(served, concurrent_run):
    _, server = served
    exported = json.loads(get(server, "/expert_stats/export", format="json").content)
    for _, out in concurrent_run:
        rid = out["meta_info"]["id"]
        assert exported["request_experts"][rid] == get(server, f"/expert_stats/requests/{rid}").json()


def test_unknown_request_is_404(served):
    r = get(served[1], "/expert_stats/requests/no-such-request")
    assert r.status_code == 404
    assert r.json()["culprit"] == "no-such-request"


def test_coactivation_matches_transformers(served, reference, concurrent_run):
    _, server = served
    n = reference.num_experts
    for layer in reference.moe_layers:
        expected = torch.zeros(n, n, dtype=torch.long)
        for tokens, _ in concurrent_run:
            for chosen in reference.choices(tokens)[layer].tolist():
                for a in chosen:
                    for b in chosen:
                        expected[a, b] += 1  # a == b: the expert's own tokens
        body = get(server, "/expert_stats/coactivation", layer_id=layer).json()
        assert body["layer_id"] == layer and body["num_experts"] == n
        assert body["counts"] == expected.tolist(), layer
    png = get(server, "/expert_stats/coactivation", layer_id=reference.moe_layers[0], format="png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert get(server, "/expert_stats/coactivation", layer_id=99).json()["culprit"] == [99, None]
    assert get(server, "/expert_stats/coactivation").status_code == 400


def test_sglang_reads_the_expert_location_export(served, tmp_path, sglang_expert_location):
    model_dir, server = served
    body = get(server, "/expert_stats/export", format="sglang")
    assert body.headers["content-disposition"].endswith('expert_stats.sglang.json"')
    path = tmp_path / "load.sglang.json"
    path.write_bytes(body.content)
    stats = get(server, "/expert_stats").json()

    counts, metadata = sglang_expert_location(model_dir, path)
    assert len(counts) == json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for layer, row in enumerate(counts):
        layer_stats = stats["layer_stats"].get(str(layer))
        want = [0] * len(row) if layer_stats is None else \
            [layer_stats["experts"][str(e)]["total_tokens_processed"] for e in range(len(row))]
        assert row == want, layer
    assert tuple(metadata.physical_to_logical_map.shape) == (len(counts), len(counts[0]))


def test_window_counts_the_last_passes(served, reference):
    _, server = served
    ids, steps = [21, 8, 97, 3, 140], 4
    out = generate(server, ids, steps)  # idle server: 1 prefill pass, then steps - 1 decode passes
    tokens = forwarded(ids, out)
    choices = reference.choices(tokens)
    for window, first in ((1, len(tokens) - 1), (steps - 1, len(ids)), (steps, 0)):
        stats = get(server, "/expert_stats", window=window).json()
        assert stats["summary"]["window"] == {"requested": window, "passes": window, "capacity": 16}
        for layer, chosen in choices.items():
            want = torch.bincount(chosen[first:].reshape(-1), minlength=reference.num_experts).tolist()
            experts = stats["layer_stats"][str(layer)]["experts"]
            assert [experts[str(e)]["total_tokens_processed"] for e in range(len(want))] == want, (window, layer)
    balance = get(server, "/expert_stats/load_balance", window=steps).json()
    assert balance["summary"]["window"]["passes"] == steps
    for layer, chosen in choices.items():
        hist = torch.bincount(chosen.reshape(-1), minlength=reference.num_experts).double()
        assert balance["layers"][str(layer)]["max_over_mean"] == pytest.approx((hist.max() / hist.mean()).item())
    assert get(server, "/expert_stats", window=0).json()["culprit"] == "window"


def test_state_folder_is_removed_when_the_server_stops(served):
    _, server = served
    found = re.search(r"state folder: (\S+)", server.log())
    assert found, server.log()[-2000:]
    folder = Path(found.group(1))
    assert folder.is_dir()
    server.stop()
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folder.exists()
