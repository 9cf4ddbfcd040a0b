"""The live expert-load page, ``GET /expert_stats/dashboard``.

One static HTML file shipped in this package (``dashboard.html``: plain JS and SVG, nothing
fetched from elsewhere) that polls the JSON routes of :mod:`.http`. The page carries no
statistics, so it is answered before the app's middleware: with ``--api-key`` a browser can
open it, and the page then asks for the key and sends it with every data request, which the
stock key check still guards.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from fastapi import FastAPI
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sglang.srt.enhanced.errors import EnhancedError

DASHBOARD_PATH = "/expert_stats/dashboard"
PAGE_FILE = "dashboard.html"
# The page's script and styles are inline; it talks to this server only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def dashboard_html() -> bytes:
    """The page as installed with the package."""
    try:
        return resources.files(__package__).joinpath(PAGE_FILE).read_bytes()
    except OSError as e:
        raise EnhancedError(f"the expert-load page is not installed: {e}", culprit=PAGE_FILE) from e


class DashboardPage:
    """ASGI app answering ``DASHBOARD_PATH`` itself and passing every other request to ``app``."""

    def __init__(self, app: ASGIApp, page: bytes) -> None:
        self.app = app
        self.page = page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DASHBOARD_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            response: Response = PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": "GET"})
        else:
            response = Response(self.page, media_type="text/html; charset=utf-8", headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
            })  # fmt: skip
        await response(scope, receive, send)


def serve_dashboard(app: FastAPI) -> None:
    """Put :class:`DashboardPage` in front of ``app``'s middleware stack when the app builds it.

    The stack is built at the first request, after SGLang has added its ``--api-key`` check.
    The page is read here, so a missing file stops the start rather than the first visit.
    """
    page = dashboard_html()
    build: Callable[[], ASGIApp] = app.build_middleware_stack

    def build_with_page() -> ASGIApp:
        return DashboardPage(build(), page)

    app.build_middleware_stack = build_with_page  # type: ignore[method-assign]
