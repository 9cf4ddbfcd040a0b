"""The live expert-load page in a real browser (headless Chromium over the DevTools protocol).

Two servers, one after the other: the demo as shipped (no key), and a tiny Qwen2-MoE with
6 layers x 16 experts behind ``--api-key``. The rendered DOM is checked against the JSON
routes read independently with ``requests``; shares are recomputed by hand from token counts.
Screenshots are kept under ``$SGLANG_ENHANCED_TEST_ARTIFACTS`` (default ``<repo>/test-artifacts``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import requests

from .browser import Chromium, Tab, chromium_path
from .server import REPO, start_enhanced

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (the start script installs it)"),
]

CONFIG = REPO / "mixed_precision_config.yaml"
PAGE = "/expert_stats/dashboard"
API_KEY = "sk-dashboard-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ARTIFACTS = Path(os.environ.get("SGLANG_ENHANCED_TEST_ARTIFACTS", REPO / "test-artifacts"))

# Everything the page shows, read from its DOM.
READ_PAGE = """(() => {
  const all = (sel) => [...document.querySelectorAll(sel)];
  return {
    cells: all('#heatmap rect.cell').map(c => [+c.dataset.layer, +c.dataset.expert, c.dataset.share, c.getAttribute('fill')]),
    cards: Object.fromEntries(all('#cards .card').map(c => [c.dataset.key, c.dataset.value])),
    worst: all('#balance tr.worst').map(r => +r.dataset.layer),
    balance: all('#balance tbody tr').map(r => [+r.dataset.layer,
      Object.fromEntries([...r.querySelectorAll('td[data-metric]')].map(td => [td.dataset.metric, td.dataset.value]))]),
    top: all('#top tr[data-layer]').map(r => [+r.dataset.layer, +r.dataset.expert, +r.dataset.tokens]),
    requests: all('#requests tr[data-request-id]').map(r => r.dataset.requestId),
    phases: Object.fromEntries(all('#phases [data-phase]').map(p => [p.dataset.phase, [+p.dataset.prefill, +p.dataset.decode]])),
    windowText: document.getElementById('window-text').textContent,
    windowSelectDisabled: document.getElementById('window-select').disabled,
    keyFormShown: !document.getElementById('key-form').hidden,
    keyMessage: document.getElementById('key-message').textContent,
  };
})()"""


def get_json(server, path: str, headers: dict | None = None) -> dict:
    r = requests.get(server.base_url + path, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def drive(server, n: int, headers: dict | None = None, first: int = 0) -> list[str]:
    """``n`` completions with the official client; their response ids."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    ids = []
    for i in range(first, first + n):
        out = client.completions.create(
            model="tiny", prompt=f"Request {i}: the sea is wide and blue, number {i * 13}", max_tokens=4 + i % 5,
            temperature=0, extra_body={"ignore_eos": True},
        )
        ids.append(out.id)
    return ids


def page_count_is(stats: dict) -> str:
    """JS: the page shows every cell and the same snapshot total as ``stats``."""
    s = stats["summary"]
    return (f"document.querySelectorAll('#heatmap rect.cell').length === {s['num_layers'] * s['num_experts']}"
            f" && document.querySelector('#cards [data-key=total_tokens]')?.dataset.value === '{s['total_tokens']}'")


def hand_shares(stats: dict) -> dict[tuple[int, int], float]:
    """Each expert's tokens over its layer's tokens, from the per-layer expert counts."""
    out = {}
    for layer, ls in stats["layer_stats"].items():
        tokens = {int(e): x["total_tokens_processed"] for e, x in ls["experts"].items()}
        total = sum(tokens.values())
        for e, t in tokens.items():
            out[(int(layer), e)] = t / total if total else 0.0
    return out


def worst_layers(stats: dict) -> set[int]:
    """The page marks the layers with the highest max/mean (above 1), at most min(3, ceil(layers / 3))."""
    ranked = sorted(((ls["load_balance"]["max_over_mean"], -int(layer)) for layer, ls in stats["layer_stats"].items()
                     if (ls["load_balance"]["max_over_mean"] or 0) > 1 + 1e-9), reverse=True)
    return {-neg for _, neg in ranked[: min(3, math.ceil(len(stats["layer_stats"]) / 3))]}


def check_page_matches(page: dict, stats: dict) -> None:
    s = stats["summary"]
    shares = hand_shares(stats)
    assert len(page["cells"]) == s["num_layers"] * s["num_experts"]
    assert {(layer, e) for layer, e, _, _ in page["cells"]} == set(shares)
    for layer, e, share, _fill in page["cells"]:
        assert float(share) == stats["expert_stats"][f"layer_{layer}_expert_{e}"]["share_of_layer_tokens"]
        assert float(share) == pytest.approx(shares[(layer, e)], abs=1e-12)
    # Equal shares get equal colours; the busiest cell is the top of the scale, an empty one its bottom.
    by_share: dict[str, set[str]] = {}
    for _, _, share, fill in page["cells"]:
        by_share.setdefault(share, set()).add(fill)
    assert all(len(fills) == 1 for fills in by_share.values())
    busiest = max(by_share, key=float)
    assert by_share[busiest] == ({"rgb(253,231,37)"} if float(busiest) > 0 else {"rgb(68,1,84)"})
    assert by_share.get("0", {"rgb(68,1,84)"}) == {"rgb(68,1,84)"}

    for key in ("num_layers", "num_experts", "top_k", "total_passes", "total_tokens", "num_requests",
                "total_input_tokens", "total_output_tokens"):
        assert page["cards"][key] == str(s[key]), key
    assert page["phases"] == {"tokens": [s["prefill_tokens"], s["decode_tokens"]],
                              "passes": [s["prefill_passes"], s["decode_passes"]]}
    for layer, metrics in page["balance"]:
        lb = stats["layer_stats"][str(layer)]["load_balance"]
        for name, value in metrics.items():
            assert (float(value) if value else None) == lb[name], (layer, name)
    assert set(page["worst"]) == worst_layers(stats)
    assert page["top"] == [[x["layer_id"], x["expert_id"], x["total_tokens_processed"]] for x in stats["top_experts"]]
    latest = sorted(stats["requests"], key=lambda r: r["time"], reverse=True)[:15]
    assert set(page["requests"]) == {r["request_id"] for r in latest}


def window_supported(server, headers: dict | None = None) -> bool:
    return "window" in get_json(server, "/expert_stats?window=1&top_k=0", headers)["summary"]


def save_screenshot(tab: Tab, name: str) -> Path:
    path = tab.screenshot(ARTIFACTS / name)
    print(f"dashboard screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with Chromium(tmp_path_factory.mktemp("chromium")) as chromium:
        yield chromium


class TestDemoPage:
    """The demo as the start script serves it (mixed precision, tracking on), no API key."""

    @pytest.fixture(scope="class")
    def server(self, demo_checkpoints, tmp_path_factory):
        srv = start_enhanced(demo_checkpoints["bf16"], tmp_path_factory.mktemp("logs-dashboard"),
                             "--enable-expert-tracking", "--disable-radix-cache", config=CONFIG, name="dashboard")
        with srv:
            srv.wait_ready(timeout=480)
            yield srv

    @pytest.fixture(scope="class")
    def tab(self, server, browser):
        drive(server, 4)
        tab = browser.new_tab()
        tab.open(server.base_url + PAGE)
        return tab

    def test_page_shows_the_statistics_and_follows_them(self, server, tab):
        stats = get_json(server, "/expert_stats")
        tab.wait_for(page_count_is(stats))
        page = tab.evaluate(READ_PAGE)
        check_page_matches(page, stats)
        assert not page["keyFormShown"]
        assert page["windowText"].startswith("since reset at ")
        # The page probes the window route after its first poll: wait for the probe's verdict.
        disabled = "false" if window_supported(server) else "true"
        tab.wait_for(f"document.getElementById('window-select').disabled === {disabled}")

        # New requests show up at the next poll.
        new_ids = drive(server, 3, first=10)
        stats = get_json(server, "/expert_stats")
        tab.wait_for(page_count_is(stats))
        page = tab.evaluate(READ_PAGE)
        check_page_matches(page, stats)
        assert set(new_ids) <= set(page["requests"])
        save_screenshot(tab, "dashboard-demo.png")

    def test_downloads_are_the_export_routes(self, server, browser, tab):
        for fmt in ("csv", "json", "png"):
            tab.click(f"button.download[data-format={fmt}]")
            got = browser.wait_download(f"expert_stats.{fmt}")
            expected = requests.get(server.base_url + "/expert_stats/export", params={"format": fmt}, timeout=120)
            if fmt == "csv":
                assert list(csv.DictReader(io.StringIO(got.decode()))) == list(csv.DictReader(io.StringIO(expected.text)))
            elif fmt == "json":
                assert json.loads(got)["expert_stats"] == expected.json()["expert_stats"]
            else:
                assert got[:8] == b"\x89PNG\r\n\x1a\n" and len(got) > 1000

    def test_reset_asks_first_then_zeroes_the_heatmap(self, server, tab):
        before = get_json(server, "/expert_stats")["summary"]["total_tokens"]
        assert before > 0
        tab.answer_dialog = lambda message: (False, "")
        tab.click("#reset")
        assert "Reset" in tab.wait_dialog()
        assert get_json(server, "/expert_stats")["summary"]["total_tokens"] == before

        tab.answer_dialog = lambda message: (True, "")
        tab.click("#reset")
        tab.wait_dialog()
        tab.wait_for("[...document.querySelectorAll('#heatmap rect.cell')].every(c => c.dataset.share === '0')"
                     " && document.querySelector('#cards [data-key=total_tokens]').dataset.value === '0'")
        stats = get_json(server, "/expert_stats")
        assert stats["summary"]["total_tokens"] == 0 and stats["requests"] == []
        page = tab.evaluate(READ_PAGE)
        check_page_matches(page, stats)
        assert page["requests"] == [] and page["top"] == []


class TestApiKey:
    """Behind ``--api-key``: the page loads, the data stays 401 until the page is given the key."""

    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

        model = build_tiny_model("qwen2_moe", tmp_path_factory.mktemp("qwen2-moe-6x16"), num_hidden_layers=6,
                                 num_experts=16)
        srv = start_enhanced(model, tmp_path_factory.mktemp("logs-dashboard-key"), "--enable-expert-tracking",
                             "--api-key", API_KEY, "--disable-radix-cache", name="dashboard-key")
        with srv:
            srv.wait_ready(timeout=480)
            yield srv

    def test_page_is_public_and_data_routes_are_not(self, server):
        from sglang.srt.enhanced.moe_tracker.surfaces.dashboard import dashboard_html

        r = requests.get(server.base_url + PAGE, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.content == dashboard_html()  # the installed file, no data in it
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        assert requests.post(server.base_url + PAGE, timeout=60).status_code == 405
        for method, path in (("GET", "/expert_stats"), ("GET", "/expert_stats/export?format=csv"),
                             ("POST", "/expert_stats/reset")):
            for headers in (None, {"Authorization": "Bearer wrong"}):
                assert requests.request(method, server.base_url + path, headers=headers, timeout=60).status_code == 401

    def test_page_asks_for_the_key_once_per_tab(self, server, browser):
        ids = drive(server, 6)
        tab = browser.new_tab()
        tab.open(server.base_url + PAGE)
        tab.wait_for("!document.getElementById('key-form').hidden")
        assert tab.evaluate("document.querySelectorAll('#heatmap rect.cell').length") == 0

        enter_key = "document.getElementById('key-input').value = {!r}; document.getElementById('key-submit').click(); true"
        tab.evaluate(enter_key.format("wrong-key"))
        tab.wait_for("!document.getElementById('key-form').hidden"
                     " && document.getElementById('key-message').textContent.includes('refused')")
        assert tab.evaluate("sessionStorage.length") == 0

        tab.evaluate(enter_key.format(API_KEY))
        stats = get_json(server, "/expert_stats", AUTH)
        tab.wait_for(page_count_is(stats))
        page = tab.evaluate(READ_PAGE)
        check_page_matches(page, stats)
        assert not page["keyFormShown"] and set(ids) <= set(page["requests"])

        # Kept for the tab: a reload does not ask again ...
        tab.open(server.base_url + PAGE)
        tab.wait_for(page_count_is(stats))
        assert not tab.evaluate(READ_PAGE)["keyFormShown"]
        # ... and downloads carry it.
        tab.click("button.download[data-format=csv]")
        got = browser.wait_download("expert_stats.csv")
        expected = requests.get(server.base_url + "/expert_stats/export?format=csv", headers=AUTH, timeout=120)
        assert list(csv.DictReader(io.StringIO(got.decode()))) == list(csv.DictReader(io.StringIO(expected.text)))
        tab.wait_for("document.getElementById('window-select').title !== ''")
        save_screenshot(tab, "dashboard.png")

        # Another tab has its own session storage: asked again.
        other = browser.new_tab()
        other.open(server.base_url + PAGE)
        other.wait_for("!document.getElementById('key-form').hidden")
        assert other.evaluate("sessionStorage.length") == 0
