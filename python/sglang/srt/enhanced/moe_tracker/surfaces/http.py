"""Expert statistics routes on SGLang's stock FastAPI app (server process).

Counters live in the scheduler processes. A read sends SGLang's own
"dump expert distribution record" request to every scheduler (the tracking
recorder answers by writing its snapshot to the state folder) and merges what
they wrote with the requests recorded here. Routes sit behind the stock
``--api-key`` middleware like every other route.

* ``GET  /expert_stats?layer_id=&expert_id=&top_k=``  statistics (JSON)
* ``POST /expert_stats/reset``                         zero the statistics
* ``GET  /expert_stats/export?format=json|csv|png``    a download
* ``GET  /expert_stats/dashboard``                     the live page polling these (see :mod:`.dashboard`)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.export import FORMATS, render_export
from sglang.srt.enhanced.moe_tracker.sglang_adapter import SNAPSHOT_PREFIX
from sglang.srt.enhanced.moe_tracker.snapshot import TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats
from sglang.srt.enhanced.moe_tracker.surfaces.dashboard import serve_dashboard
from sglang.srt.enhanced.moe_tracker.surfaces.requests import record_finished_requests
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

logger = logging.getLogger(__name__)

_MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "png": "image/png"}


class ExpertStatsService:
    """Collects scheduler snapshots and this process's request records."""

    def __init__(self, state_dir: Path, requests: ExpertActivationTracker) -> None:
        self.state_dir = state_dir
        self.requests = requests
        self._lock = asyncio.Lock()

    @staticmethod
    def _tokenizer_manager() -> Any:
        from sglang.srt.entrypoints.http_server import _global_state

        return _global_state.tokenizer_manager

    async def snapshot(self) -> TrackerSnapshot:
        """Fresh snapshots of every scheduler, merged, with the finished requests."""
        async with self._lock:
            asked = time.time()
            await self._tokenizer_manager().dump_expert_distribution_record()
            snapshots = [self.requests.snapshot()]
            for path in sorted(self.state_dir.glob(f"{SNAPSHOT_PREFIX}*.json")):
                if path.stat().st_mtime >= asked - 1.0:
                    snapshots.append(TrackerSnapshot.from_dict(json.loads(path.read_text())))
            if len(snapshots) == 1:
                raise EnhancedError("no scheduler answered with expert statistics", culprit=str(self.state_dir))
            return TrackerSnapshot.merge(snapshots)

    async def reset(self) -> None:
        async with self._lock:
            await self._tokenizer_manager().start_expert_distribution_record()
            self.requests.reset_stats()


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


def _bad_request(e: EnhancedError) -> JSONResponse:
    return JSONResponse({"error": str(e), "culprit": _plain(e.culprit)}, status_code=400)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def add_expert_stats_routes(app: FastAPI, server_args: Any, state_dir: Path) -> ExpertStatsService:
    """Add the routes (and the recording of finished requests) to SGLang's ``app``; return their service."""
    requests = ExpertActivationTracker()  # request records only; counters live in the schedulers
    service = ExpertStatsService(state_dir, requests)

    @app.get("/expert_stats")
    async def expert_stats(request: Request) -> Response:
        try:
            layer_id = _int_param(request, "layer_id", None)
            expert_id = _int_param(request, "expert_id", None)
            top_k = _int_param(request, "top_k", 10)
            if expert_id is not None and layer_id is None:
                raise EnhancedError("expert_id needs layer_id", culprit="expert_id")
            snap = await service.snapshot()
            return JSONResponse(expert_activation_stats(snap, layer_id=layer_id, expert_id=expert_id, top_k=top_k))
        except EnhancedError as e:
            return _bad_request(e)

    @app.post("/expert_stats/reset")
    async def expert_stats_reset() -> Response:
        await service.reset()
        return JSONResponse({"status": "ok", "reset_time": time.time()})

    @app.get("/expert_stats/export")
    async def expert_stats_export(request: Request) -> Response:
        fmt = request.query_params.get("format", "json").lower()
        if fmt not in FORMATS:
            return _bad_request(EnhancedError(f"format must be one of {list(FORMATS)}, got {fmt!r}", culprit="format"))
        snap = await service.snapshot()
        payload = render_export(expert_activation_stats(snap, top_k=snap.num_layers * snap.num_experts), fmt)
        return Response(
            payload, media_type=_MEDIA_TYPES[fmt],
            headers={"Content-Disposition": f'attachment; filename="expert_stats.{fmt}"'},
        )

    serve_dashboard(app)

    if getattr(server_args, "enable_metrics", False):
        from sglang.srt.enhanced.moe_tracker.surfaces.prometheus import add_metrics_refresh

        add_metrics_refresh(app, service.snapshot)

    @app.middleware("http")
    async def record_requests(request: Request, call_next):  # noqa: ANN001, ANN202
        # The tokenizer manager exists once the server runs; hook it before the first
        # request is handled (SGLang's own warm-up request included).
        record_finished_requests(ExpertStatsService._tokenizer_manager(), requests)
        return await call_next(request)

    return service
