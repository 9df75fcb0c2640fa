"""``GET /v1/models``: the server's own model ids, the run's base (loaded on first use), then the models
fine-tuning jobs made."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from loratui.serving.state import AppContext, context

router = APIRouter()


@router.get("/v1/models")
async def models(ctx: Annotated[AppContext, Depends(context)]) -> dict[str, Any]:
    tuned = await asyncio.to_thread(ctx.fine_tuned)
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "loratui"} for m in ctx.own() + ctx.extra]
        + [{"id": m, "object": "model", "created": t, "owned_by": "loratui-fine-tuning"} for m, t in tuned.items()],
    }
