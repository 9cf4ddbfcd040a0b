"""Expert statistics of a running server: concurrency, reset, export, errors, API key, metrics.

One server (tiny Qwen2-MoE on CPU) with tracking, Prometheus metrics and an API key;
the radix cache is off so every prompt token is forwarded. Expected token counts
come from the ``usage`` the OpenAI client reports for each request.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .server import start_enhanced

pytestmark = pytest.mark.e2e

API_KEY = "sk-test-expert-stats"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("qwen2_moe")
    srv = start_enhanced(model_dir, tmp_path_factory.mktemp("logs-tracking"), "--enable-expert-tracking",
                         "--enable-metrics", "--api-key", API_KEY, "--disable-radix-cache", name="tracking")
    with srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def get_stats(server, **params) -> dict:
    r = requests.get(server.base_url + "/expert_stats", params=params, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def reset(server) -> None:
    r = requests.post(server.base_url + "/expert_stats/reset", headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text


def complete(client, i: int, max_tokens: int = MAX_TOKENS):
    return client.completions.create(
        model="tiny", prompt=f"Prompt {i}: the quick brown fox number {i * 7} jumps", max_tokens=max_tokens,
        temperature=0, extra_body={"ignore_eos": True},
    )


def layer_totals(stats: dict) -> dict[str, int]:
    return {layer: s["total_tokens"] for layer, s in stats["layer_stats"].items()}


def phase_totals(stats: dict, phase: str) -> dict[str, int]:
    return {layer: sum(e[f"{phase}_tokens"] for e in s["experts"].values()) for layer, s in stats["layer_stats"].items()}


def test_concurrent_requests_are_counted_consistently(server, client):
    reset(server)
    polls: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            polls.append(get_stats(server))
            time.sleep(0.2)

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda i: complete(client, i), range(32)))
    stop.set()
    poller.join()

    assert all(r.usage.completion_tokens == MAX_TOKENS for r in responses)
    stats = get_stats(server)
    top_k = stats["summary"]["top_k"]
    prompt_tokens = sum(r.usage.prompt_tokens for r in responses)
    decode_tokens = sum(r.usage.completion_tokens - 1 for r in responses)
    # Every MoE layer sees every forwarded token, top_k times; prefill is exact.
    assert set(phase_totals(stats, "prefill").values()) == {top_k * prompt_tokens}
    decoded = set(phase_totals(stats, "decode").values())
    assert len(decoded) == 1
    # The overlap scheduler may run one extra decode step for a request that just finished.
    assert top_k * decode_tokens <= decoded.pop() <= top_k * (decode_tokens + len(responses))
    # Reads taken while requests ran saw whole passes: the same total in every layer.
    assert len(polls) >= 2
    for snap in polls:
        totals = set(layer_totals(snap).values())
        assert len(totals) == 1 and totals.pop() % top_k == 0

    recorded = {r["request_id"]: r for r in stats["requests"]}
    for resp in responses:
        assert resp.id in recorded, resp.id
        assert recorded[resp.id]["input_length"] == resp.usage.prompt_tokens
        assert recorded[resp.id]["output_length"] == resp.usage.completion_tokens


def test_reset_during_load_keeps_what_follows(server, client):
    with ThreadPoolExecutor(max_workers=24) as pool:
        before = [pool.submit(complete, client, 100 + i, 32) for i in range(16)]
        time.sleep(1.0)
        reset(server)
        after = [pool.submit(complete, client, 200 + i) for i in range(8)]
        after_responses = [f.result() for f in after]
        for f in before:
            f.result()
    stats = get_stats(server)
    top_k = stats["summary"]["top_k"]
    needed = top_k * sum(r.usage.prompt_tokens + r.usage.completion_tokens - 1 for r in after_responses)
    for layer, total in layer_totals(stats).items():
        assert total >= needed, layer
    recorded = {r["request_id"] for r in stats["requests"]}
    assert {r.id for r in after_responses} <= recorded


def test_filters_and_top_experts(server, client):
    complete(client, 300)
    full = get_stats(server, top_k=3)
    assert len(full["top_experts"]) <= 3
    tokens = [e["total_tokens_processed"] for e in full["top_experts"]]
    assert tokens == sorted(tokens, reverse=True)
    layer = get_stats(server, layer_id=1)
    assert list(layer["layer_stats"]) == ["1"]
    assert all(v["layer_id"] == 1 for v in layer["expert_stats"].values())
    one = get_stats(server, layer_id=1, expert_id=2)
    assert (one["layer_id"], one["expert_id"]) == (1, 2)
    assert one["total_tokens_processed"] == layer["layer_stats"]["1"]["experts"]["2"]["total_tokens_processed"]


@pytest.mark.parametrize("params, culprit", [
    ({"layer_id": "abc"}, "layer_id"),
    ({"top_k": "-1"}, "top_k"),
    ({"layer_id": "99"}, [99, None]),
    ({"layer_id": "0", "expert_id": "99"}, [0, 99]),
    ({"expert_id": "1"}, "expert_id"),
])
def test_bad_query_parameters_get_400(server, params, culprit):
    r = requests.get(server.base_url + "/expert_stats", params=params, headers=AUTH, timeout=60)
    assert r.status_code == 400
    body = r.json()
    assert body["culprit"] == culprit
    assert body["error"]


def test_export_round_trips(server, client):
    complete(client, 400)
    base = server.base_url + "/expert_stats/export"
    as_json = requests.get(base, params={"format": "json"}, headers=AUTH, timeout=120)
    assert as_json.status_code == 200
    assert "attachment" in as_json.headers["content-disposition"]
    exported = json.loads(as_json.content)
    live = get_stats(server)
    assert exported["layer_stats"].keys() == live["layer_stats"].keys()
    for key, entry in exported["expert_stats"].items():
        assert entry["total_tokens_processed"] <= live["expert_stats"][key]["total_tokens_processed"]

    as_csv = requests.get(base, params={"format": "csv"}, headers=AUTH, timeout=120)
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == len(exported["expert_stats"])
    by_key = {(int(r["layer_id"]), int(r["expert_id"])): r for r in rows}
    for entry in exported["expert_stats"].values():
        row = by_key[(entry["layer_id"], entry["expert_id"])]
        assert int(row["total_tokens_processed"]) == entry["total_tokens_processed"]

    as_png = requests.get(base, params={"format": "png"}, headers=AUTH, timeout=120)
    assert as_png.headers["content-type"] == "image/png"
    assert as_png.content[:8] == b"\x89PNG\r\n\x1a\n"

    bad = requests.get(base, params={"format": "xml"}, headers=AUTH, timeout=60)
    assert bad.status_code == 400 and bad.json()["culprit"] == "format"
    no_path = requests.get(base, params={"format": "json", "path": "/etc/passwd"}, headers=AUTH, timeout=60)
    assert no_path.status_code == 200 and no_path.headers["content-type"].startswith("application/json")


def test_api_key_is_enforced(server):
    for method, path in (("get", "/expert_stats"), ("post", "/expert_stats/reset"), ("get", "/expert_stats/export")):
        r = requests.request(method, server.base_url + path, timeout=60)
        assert r.status_code == 401, path
        wrong = requests.request(method, server.base_url + path, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401, path


def test_prometheus_counters_follow_lifetime_totals(server, client):
    complete(client, 500)
    metrics = requests.get(server.base_url + "/metrics", timeout=120).text
    summary = get_stats(server)["summary"]
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("sglang_enhanced_expert_tokens_total{")]
    assert values, metrics[:2000]
    # No traffic ran between the scrape and the read: the counters equal the lifetime total.
    assert sum(values) == summary["lifetime_tokens"]
    assert any(line.startswith('sglang_enhanced_expert_tokens_total{expert="') and 'phase="decode"' in line
               for line in metrics.splitlines())
    # Balance gauges per layer: over the last --expert-window-passes (default 1000) passes.
    balance = requests.get(server.base_url + "/expert_stats/load_balance", params={"window": 1000},
                           headers=AUTH, timeout=120).json()["layers"]
    for name, key in (("max_over_mean", "max_over_mean"), ("coefficient_of_variation", "coefficient_of_variation")):
        gauges = {line.split('layer="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.splitlines() if line.startswith(f"sglang_enhanced_expert_load_{name}{{")}
        assert set(gauges) == set(balance)
        for layer, value in gauges.items():
            assert value == pytest.approx(balance[layer][key]), (name, layer)
