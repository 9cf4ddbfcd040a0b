"""Expert statistics routes on SGLang's stock FastAPI app (server process).

Counters live in the scheduler processes; every read goes through the statistics exchange
(``exchange.py``) and is merged with the finished requests recorded here. Routes sit behind
the stock ``--api-key`` middleware like every other route.

* ``GET  /expert_stats?layer_id=&expert_id=&top_k=&window=``  statistics (JSON); ``window=N``:
  over the last N forward passes instead of since the reset
* ``GET  /expert_stats/load_balance?window=``                 per-layer balance figures
* ``GET  /expert_stats/requests/{request_id}``                one finished request's expert use
* ``GET  /expert_stats/coactivation?layer_id=&format=json|png`` pair counts of one layer
* ``POST /expert_stats/reset``                                zero the statistics
* ``GET  /expert_stats/export?format=json|csv|png|sglang``    a download
* ``GET  /expert_stats/dashboard``                            the live page polling these (see :mod:`.dashboard`)
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.exchange import StatsExchange, StatsQuery
from sglang.srt.enhanced.moe_tracker.export import (
    FILE_NAMES,
    FORMATS,
    MEDIA_TYPES,
    render_coactivation_png,
    render_export,
)
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot, merge_requests
from sglang.srt.enhanced.moe_tracker.stats import (
    coactivation_stats,
    expert_activation_stats,
    load_balance_by_layer,
    request_expert_use,
)
from sglang.srt.enhanced.moe_tracker.surfaces.asgi import before_each_request
from sglang.srt.enhanced.moe_tracker.surfaces.dashboard import serve_dashboard
from sglang.srt.enhanced.moe_tracker.surfaces.requests import RequestLog, record_finished_requests
from sglang.srt.enhanced.settings import LaunchSettings

logger = logging.getLogger(__name__)


class ExpertStatsService:
    """Asks the schedulers through the exchange and joins this process's request records."""

    def __init__(self, state_dir: Path, log: RequestLog) -> None:
        self.exchange = StatsExchange(state_dir)
        self.log = log
        self._lock = asyncio.Lock()

    @staticmethod
    def _tokenizer_manager() -> Any:
        from sglang.srt.entrypoints.http_server import _global_state

        return _global_state.tokenizer_manager

    async def snapshot(self, query: StatsQuery | None = None) -> TrackerSnapshot:
        """Fresh snapshots of every scheduler for ``query``, merged, with the finished requests."""
        async with self._lock:
            query_id = self.exchange.post_query(query or StatsQuery())
            await self._tokenizer_manager().dump_expert_distribution_record()
            snapshots = self.exchange.answers(query_id)
            if not snapshots:
                raise EnhancedError("no scheduler answered with expert statistics",
                                    culprit=str(self.exchange.state_dir))
            merged = TrackerSnapshot.merge(snapshots)
            merged.requests = merge_requests(self.log.records() + merged.requests)
            return merged

    async def reset(self) -> None:
        async with self._lock:
            await self._tokenizer_manager().start_expert_distribution_record()
            self.log.clear()


def _int_param(request: Request, name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnhancedError(f"query parameter {name} must be an integer, got {raw!r}", culprit=name) from None
    if value < minimum:
        raise EnhancedError(f"query parameter {name} must be >= {minimum}, got {value}", culprit=name)
    return value


def _bad_request(e: EnhancedError, status_code: int = 400) -> JSONResponse:
    return JSONResponse({"error": str(e), "culprit": _plain(e.culprit)}, status_code=status_code)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _download(payload: bytes, fmt: str) -> Response:
    return Response(payload, media_type=MEDIA_TYPES[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{FILE_NAMES[fmt]}"'})


def add_expert_stats_routes(app: FastAPI, server_args: Any, state_dir: Path) -> ExpertStatsService:
    """Add the routes (and the recording of finished requests) to SGLang's ``app``; return their service."""
    log = RequestLog()
    service = ExpertStatsService(state_dir, log)

    @app.get("/expert_stats")
    async def expert_stats(request: Request) -> Response:
        try:
            layer_id = _int_param(request, "layer_id", None)
            expert_id = _int_param(request, "expert_id", None)
            top_k = _int_param(request, "top_k", 10)
            window = _int_param(request, "window", None, minimum=1)
            if expert_id is not None and layer_id is None:
                raise EnhancedError("expert_id needs layer_id", culprit="expert_id")
            snap = await service.snapshot(StatsQuery(window=window))
            return JSONResponse(expert_activation_stats(snap, layer_id=layer_id, expert_id=expert_id, top_k=top_k))
        except EnhancedError as e:
            return _bad_request(e)

    @app.get("/expert_stats/load_balance")
    async def expert_stats_load_balance(request: Request) -> Response:
        try:
            window = _int_param(request, "window", None, minimum=1)
            return JSONResponse(load_balance_by_layer(await service.snapshot(StatsQuery(window=window))))
        except EnhancedError as e:
            return _bad_request(e)

    @app.get("/expert_stats/requests/{request_id}")
    async def expert_stats_request(request_id: str) -> Response:
        try:
            snap = await service.snapshot(StatsQuery(request_ids=(request_id,)))
        except EnhancedError as e:
            return _bad_request(e)
        try:
            return JSONResponse(request_expert_use(snap, request_id))
        except EnhancedError as e:
            return _bad_request(e, status_code=404)

    @app.get("/expert_stats/coactivation")
    async def expert_stats_coactivation(request: Request) -> Response:
        try:
            layer_id = _int_param(request, "layer_id", None)
            if layer_id is None:
                raise EnhancedError("query parameter layer_id is required", culprit="layer_id")
            fmt = request.query_params.get("format", "json").lower()
            if fmt not in ("json", "png"):
                raise EnhancedError(f"format must be json or png, got {fmt!r}", culprit="format")
            snap = await service.snapshot(StatsQuery(coactivation_layers=(layer_id,)))
            stats = coactivation_stats(snap, layer_id)
        except EnhancedError as e:
            return _bad_request(e)
        if fmt == "png":
            return Response(render_coactivation_png(stats), media_type="image/png")
        return JSONResponse(stats)

    @app.post("/expert_stats/reset")
    async def expert_stats_reset() -> Response:
        await service.reset()
        return JSONResponse({"status": "ok", "reset_time": time.time()})

    @app.get("/expert_stats/export")
    async def expert_stats_export(request: Request) -> Response:
        fmt = request.query_params.get("format", "json").lower()
        if fmt not in FORMATS:
            return _bad_request(EnhancedError(f"format must be one of {list(FORMATS)}, got {fmt!r}", culprit="format"))
        try:
            snap = await service.snapshot(StatsQuery(request_ids=None if fmt == "json" else ()))
        except EnhancedError as e:
            return _bad_request(e)
        payload = render_export(expert_activation_stats(snap, top_k=snap.num_layers * snap.num_experts), fmt)
        return _download(payload, fmt)

    serve_dashboard(app)

    if getattr(server_args, "enable_metrics", False):
        from sglang.srt.enhanced.moe_tracker.surfaces.prometheus import add_metrics_refresh

        window = LaunchSettings.from_env().expert_window_passes
        add_metrics_refresh(app, service.snapshot, window or None)

    async def record_requests(_path: str) -> None:
        # The tokenizer manager exists once the server runs; hook it before the first
        # request is handled (SGLang's own warm-up request included).
        record_finished_requests(ExpertStatsService._tokenizer_manager(), log)

    before_each_request(app, record_requests)

    return service
