"""``GET /expert_stats/plan?budget=20GiB``: a per-expert precision config from live statistics.

The server's own checkpoints (its config's ``int4_path``, ``fp8_path`` and the model
folder) are measured once, on the first request, in a worker thread; every request then
plans from the statistics of that moment (:class:`PrecisionPlanner`). Non-expert weights
keep the precision the running config gives them. Query parameters: ``budget``
(required, e.g. ``20GiB`` or bytes), ``strategy`` (``optimal`` by default, ``random``,
``uniform``) and ``seed``. Returns the YAML (``application/yaml``); bad parameters get
``400`` with ``{"error", "culprit"}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.precision_planner import (
    STRATEGIES,
    PrecisionPlanner,
    keep_rules_of,
    tokens_from_stats,
)

__all__ = ["add_precision_plan_route"]


def _planner_for(config: EnhancedConfig) -> PrecisionPlanner:
    if config.model_path is None:
        raise EnhancedError("the server has no model folder to plan for", culprit="--model")
    folders = {p: config.source_path(p) for p in (Precision.INT4, Precision.FP8) if config.source_path(p)}
    folders[Precision.BF16] = config.source_path(Precision.BF16) or config.model_path
    return PrecisionPlanner(config.model_path, folders, keep=keep_rules_of(config))


def add_precision_plan_route(
    app: FastAPI, config: EnhancedConfig, statistics: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    """Add the route; ``statistics`` returns the tracker's statistics (the ``/expert_stats`` JSON)."""
    planner: list[PrecisionPlanner] = []
    lock = asyncio.Lock()

    async def get_planner() -> PrecisionPlanner:
        async with lock:
            if not planner:
                planner.append(await asyncio.to_thread(_planner_for, config))
            return planner[0]

    @app.get("/expert_stats/plan")
    async def expert_stats_plan(request: Request) -> Response:
        from sglang.srt.enhanced.tools.quantize import parse_size

        try:
            raw = request.query_params.get("budget")
            if not raw:
                raise EnhancedError("query parameter budget is required, e.g. budget=20GiB", culprit="budget")
            budget = parse_size(raw, culprit="budget")
            strategy = request.query_params.get("strategy", "optimal")
            if strategy not in STRATEGIES:
                raise EnhancedError(f"strategy must be one of {list(STRATEGIES)}", culprit="strategy")
            seed_text = request.query_params.get("seed", "0")
            if not seed_text.isdigit():
                raise EnhancedError("seed must be a non-negative integer", culprit="seed")
            tokens = tokens_from_stats(await statistics())
            chosen = await get_planner()
            plan = await asyncio.to_thread(chosen.plan, tokens, budget, strategy=strategy, seed=int(seed_text))
        except EnhancedError as e:
            return JSONResponse({"error": str(e), "culprit": e.culprit}, status_code=400)
        return Response(plan.to_yaml(), media_type="application/yaml",
                        headers={"Content-Disposition": 'inline; filename="plan.yaml"'})
