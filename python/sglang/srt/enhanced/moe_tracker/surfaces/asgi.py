"""Run a coroutine ahead of each HTTP request, as a plain ASGI middleware.

Starlette's ``@app.middleware("http")`` (``BaseHTTPMiddleware``) pipes every response
through a memory stream and a task of its own; on SGLang's streamed ``/generate`` that is
per token chunk, and it added about a third to the time 64 concurrent streams of 64 chunks
took (``benchmarks/bench_http_middleware.py``). Here the request and its response pass
through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

__all__ = ["before_each_request"]

Before = Callable[[str], Awaitable[None]]


class _BeforeRequests:
    def __init__(self, app: Any, before: Before) -> None:
        self.app = app
        self.before = before

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            await self.before(scope["path"])
        await self.app(scope, receive, send)


def before_each_request(app: FastAPI, before: Before) -> None:
    """Await ``before(path)`` ahead of every HTTP request ``app`` handles (add before the app starts)."""
    app.add_middleware(_BeforeRequests, before=before)
