"""The expert-load page: installed with the package, self-contained, served ahead of the key check.

The app here is a plain FastAPI app with SGLang's own ``add_api_key_middleware`` added after
the page (as ``launch_server`` does), so the order of the real server is reproduced.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from sglang.srt.enhanced.moe_tracker.surfaces.dashboard import DASHBOARD_PATH, dashboard_html, serve_dashboard
from sglang.srt.utils import add_api_key_middleware

KEY = "sk-unit"


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()

    @app.get("/expert_stats")
    async def stats() -> dict:
        return {"ok": True}

    serve_dashboard(app)
    add_api_key_middleware(app, KEY)  # added later, as SGLang does when the server starts
    return TestClient(app)


def test_page_file_is_installed_with_the_package():
    installed = resources.files("sglang.srt.enhanced.moe_tracker.surfaces").joinpath("dashboard.html")
    assert installed.is_file()
    assert dashboard_html() == installed.read_bytes()


def test_page_needs_nothing_from_elsewhere():
    page = dashboard_html().decode()
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, flags=re.IGNORECASE)
    assert "@import" not in page and "url(http" not in page
    # It reads the routes of this server, by path.
    for route in ("/expert_stats?", "/expert_stats/reset", "/expert_stats/export?format="):
        assert route in page
    assert len(page) < 40_000


def test_page_is_served_without_the_key_and_data_routes_are_not(client: TestClient):
    page = client.get(DASHBOARD_PATH)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == dashboard_html()
    assert page.headers["cache-control"] == "no-store"
    assert client.head(DASHBOARD_PATH).status_code == 200
    assert client.post(DASHBOARD_PATH).status_code == 405

    assert client.get("/expert_stats").status_code == 401
    assert client.get(DASHBOARD_PATH + "/x").status_code == 401  # only the page itself is public
    assert client.get("/expert_stats", headers={"Authorization": f"Bearer {KEY}"}).json() == {"ok": True}
