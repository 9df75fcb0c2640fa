"""``GET /health`` (503 while loading, 200 when ready or degraded) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from loratui.serving.state import AppContext, context

router = APIRouter()


@router.get("/health")
async def health(ctx: Annotated[AppContext, Depends(context)]) -> JSONResponse:
    state = ctx.state
    body = {
        "status": state.status,
        "model": state.model_id,
        "backend": state.backend.kind if state.backend else None,
        "serving": state.chosen,
    }
    status = state.status
    describe = getattr(state.backend, "engine_state", None)  # an engine in its own process (vLLM)
    if describe is not None:
        engine = describe()
        body["engine"] = engine
        if engine["state"] != "ready" and status in ("ok", "degraded"):
            status = body["status"] = "failed"
            body["reason"] = f"the {engine['name']} engine is {engine['state']} (its log: {engine.get('log')})"
    if state.reason:
        body.setdefault("reason", state.reason)
    return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)


@router.get("/metrics")
async def prometheus(ctx: Annotated[AppContext, Depends(context)]) -> PlainTextResponse:
    return PlainTextResponse(ctx.metrics.render(ctx.state), media_type="text/plain; version=0.0.4")
