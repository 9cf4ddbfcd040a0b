"""``before_each_request``: the hook runs ahead of each HTTP request; responses pass untouched."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from sglang.srt.enhanced.moe_tracker.surfaces.asgi import before_each_request


def test_hook_sees_each_path_before_its_handler_and_streams_pass_through() -> None:
    app = FastAPI()
    events: list[str] = []

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        events.append("handler")

        async def chunks():  # noqa: ANN202
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks())

    async def before(path: str) -> None:
        events.append(f"before {path}")

    before_each_request(app, before)
    with TestClient(app) as client:
        assert client.get("/stream").text == "chunk0;chunk1;chunk2;"
        assert client.get("/missing").status_code == 404
    assert events == ["before /stream", "handler", "before /missing"]
