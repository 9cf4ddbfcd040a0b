"""``GET /mixed_precision`` on SGLang's stock FastAPI app (server process).

The model lives in the scheduler processes; each TP rank writes its memory report to
the launcher's state folder when its load finishes (:mod:`.serving.report`). The route
merges them. It sits behind the stock ``--api-key`` middleware like every other route.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from sglang.srt.enhanced.mixed_precision.serving.report import merge_reports, read_reports

__all__ = ["add_mixed_precision_route"]


def add_mixed_precision_route(app: FastAPI, state_dir: Path) -> None:
    """Add ``GET /mixed_precision`` (the served weights per precision and module) to ``app``."""

    @app.get("/mixed_precision")
    async def mixed_precision() -> Response:
        reports = read_reports(state_dir)
        if not reports:
            return JSONResponse(
                {"error": "no model has finished loading yet", "culprit": str(state_dir)}, status_code=503
            )
        return JSONResponse(merge_reports(reports))
