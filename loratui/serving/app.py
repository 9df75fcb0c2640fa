"""The OpenAI-compatible HTTP API (FastAPI) over one :class:`~loratui.serving.backends.Backend`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events, ``stream_options.include_usage``), ``GET /health`` (503 while loading, 200 when
ready or degraded) and ``GET /metrics`` (Prometheus text). With a :class:`~loratui.serving.finetune.JobManager`,
also the files and fine-tuning jobs API (:mod:`loratui.serving.finetune.routes`); the models its jobs make are
listed in ``/v1/models`` and served from a :class:`~loratui.serving.pool.ModelPool`, loaded on first use.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON,
missing or out-of-range fields and prompts past the context, 401 for a bad key, 404 for an unknown
model or route, 413 for a body over the limit, 429 when the queue is full. A client error never
yields a 5xx. A client that disconnects mid-stream cancels its generation.

The routes live in :mod:`loratui.serving.routes` (one router per concern) and read what they share from
the :class:`~loratui.serving.state.AppContext` on ``app.state``; this module wires them up with the
lifespan, the body-size and API-key guard and the error handlers.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratui.serving.errors import ApiError
from loratui.serving.routes import completions, health, models
from loratui.serving.routes import ui as page
from loratui.serving.state import AppContext, Limits, ServerState, context

if TYPE_CHECKING:
    from loratui.serving.finetune import JobManager
    from loratui.serving.pool import ModelPool


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
    "/ui/models",
    "/v1/files",
    "/v1/fine_tuning/jobs",
)


def _route_label(path: str) -> str:
    if path.startswith("/ui/static/"):
        return "/ui/static"
    for route in ROUTES:
        if path == route or (route in ("/v1/files", "/v1/fine_tuning/jobs") and path.startswith(route + "/")):
            return route
    return "other"


async def _guard(request: Request, call_next: Any) -> Any:
    """Bodies over the limit get 413 and requests without the API key 401 (but /health); every answer is counted."""
    ctx = context(request)
    route = request.url.path
    length = request.headers.get("content-length")
    upload = ctx.uploads and route == "/v1/files" and request.method == "POST"  # its own limit
    if length and length.isdigit() and int(length) > ctx.limits.max_body_bytes and not upload:
        response = _error(413, f"request body of {length} bytes is over the limit of {ctx.limits.max_body_bytes}")
    elif ctx.api_key and not _public(ctx, route) and not _authorized(request, ctx.api_key):
        response = _error(
            401, "Incorrect API key provided: send it as `Authorization: Bearer <key>`.", code="invalid_api_key"
        )
    else:
        response = await call_next(request)
    ctx.metrics.request(_route_label(route), response.status_code)
    return response


def _public(ctx: AppContext, route: str) -> bool:
    """What answers without the API key: /health, and the chat page's own files (it asks for the key itself)."""
    return route == "/health" or (ctx.ui and page.is_page_file(route))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param = ".".join(loc) or None
    return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(
        exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error"
    )


def create_app(
    state: ServerState,
    api_key: str | None = None,
    limits: Limits | None = None,
    loader: Callable[[ServerState], None] | None = None,
    jobs: JobManager | None = None,
    pool: ModelPool | None = None,
    extra_models: list[str] | None = None,
    ui: bool = False,
) -> FastAPI:
    """The app; ``loader(state)`` runs in a thread at start-up and fills ``state.backend``. ``jobs``: also the
    fine-tuning API, its models served from ``pool``; so are ``extra_models`` (the run's base). ``ui``: the chat
    page at ``/`` (:mod:`loratui.serving.routes.ui`)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if loader is not None:  # /health answers 503 until it is done
            threading.Thread(target=loader, args=(state,), name="loader", daemon=True).start()
        if jobs is not None:
            await asyncio.to_thread(jobs.start)
        yield
        if jobs is not None:  # running jobs checkpoint and are marked failed, resumable
            await asyncio.to_thread(jobs.shutdown)
        if pool is not None:
            pool.close()
        if state.backend is not None:
            state.backend.close()

    app = FastAPI(title="loratui", docs_url=None, redoc_url=None, lifespan=lifespan)
    ctx = AppContext(state, limits, api_key=api_key, pool=pool, extra=list(extra_models or []), ui=ui)
    if jobs is not None:
        ctx.uploads, ctx.fine_tuned = True, jobs.fine_tuned_models
    app.state.loratui = ctx
    app.middleware("http")(_guard)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http)
    for router in (health.router, models.router, completions.router):
        app.include_router(router)
    if ui:
        app.include_router(page.router)
    if jobs is not None:
        from loratui.serving.finetune.routes import add_routes

        add_routes(app, jobs, limits.max_upload_bytes)
    return app


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
