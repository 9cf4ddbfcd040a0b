"""What an HTTP middleware costs SGLang-style streamed responses: one uvicorn server, a streaming
route of ``--chunks`` chunks (2 ms apart, ~200 bytes each, as ``/generate`` streams tokens), and
``--streams`` concurrent clients in another process; wall time until every stream has ended.

    python benchmarks/bench_http_middleware.py [--streams 64] [--chunks 64] [--repeats 3]

Variants: no middleware; Starlette's ``@app.middleware("http")`` (``BaseHTTPMiddleware``); the
plain ASGI middleware the tracker's routes use (``moe_tracker.surfaces.asgi.before_each_request``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from sglang.srt.enhanced.moe_tracker.surfaces.asgi import before_each_request

CLIENT = """
import asyncio, sys, time, httpx
async def main(port, streams):
    async with httpx.AsyncClient(timeout=120) as client:
        async def one():
            async with client.stream("GET", f"http://127.0.0.1:{port}/stream") as reply:
                async for _ in reply.aiter_raw():
                    pass
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(streams)])
        print(time.perf_counter() - t0)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def make_app(variant: str, chunks: int) -> FastAPI:
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():  # noqa: ANN202
            for _ in range(chunks):
                await asyncio.sleep(0.002)
                yield b"data: " + b"x" * 200 + b"\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    if variant == "BaseHTTPMiddleware":
        @app.middleware("http")
        async def passthrough(request, call_next):  # noqa: ANN001, ANN202
            return await call_next(request)
    elif variant == "plain ASGI":
        async def nothing(_path: str) -> None:
            return None

        before_each_request(app, nothing)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(variant: str, streams: int, chunks: int) -> float:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(variant, chunks), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        done = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(streams)], capture_output=True,
                              text=True, check=True)  # fmt: skip
        return float(done.stdout.strip())
    finally:
        server.should_exit = True
        thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    variants = ("none", "BaseHTTPMiddleware", "plain ASGI")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so machine load hits every variant alike
        for v in variants:
            times[v].append(run_once(v, args.streams, args.chunks))
    print(f"{args.streams} concurrent streams x {args.chunks} chunks, {args.repeats} repeats")
    print("| middleware | median s | all runs (s) |")
    print("| --- | --- | --- |")
    for v in variants:
        runs = ", ".join(f"{t:.2f}" for t in times[v])
        print(f"| {v} | {statistics.median(times[v]):.2f} | {runs} |")


if __name__ == "__main__":
    main()
