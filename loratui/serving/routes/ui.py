"""The chat page: ``GET /`` and its files under ``/ui/static/``, and ``GET /ui/models``, what the page shows
beside each model (its role, runtime and format, whether it is loaded) and which two it compares by default.

The page is plain HTML, CSS and JavaScript shipped in the package (``loratui/serving/ui/``): nothing is
fetched from elsewhere, and the Content-Security-Policy sent with it lets the browser load nothing but this
server's own files. The page and its files answer without the API key (they hold no secret; the page asks
for the key when the API answers 401 and keeps it in the tab's session storage); ``/ui/models`` needs it.
"""

from __future__ import annotations

import asyncio
from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from loratui.serving.errors import ApiError
from loratui.serving.state import AppContext, context

router = APIRouter()

FILES = {  # name -> media type; nothing else is served
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_page_file(path: str) -> bool:
    """The page and its static files (public: the API key guard lets them through)."""
    return path == "/" or (path.startswith("/ui/static/") and path.removeprefix("/ui/static/") in FILES)


@cache
def _read(name: str) -> bytes:
    return resources.files("loratui.serving").joinpath("ui", name).read_bytes()


@cache
def _index() -> bytes:
    from loratui import __version__

    return _read("index.html").replace(b"{{version}}", __version__.encode())


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index() -> Response:
    return Response(_index(), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/ui/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def static(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, f"no such file: /ui/static/{name}", code="not_found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


def _entry(model: str, role: str, backend: Any, status: str | None = None) -> dict[str, Any]:
    """One model; ``status``: the server's own model's, else loaded on first use: ``ok`` once loaded."""
    return {
        "id": model,
        "role": role,
        "backend": getattr(backend, "kind", None),
        "format": getattr(backend, "format", None),
        "status": status or ("ok" if backend is not None else "not loaded"),
    }


def describe(ctx: AppContext, tuned: dict[str, int]) -> dict[str, Any]:
    """Every served model with its role (``tuned``: a run; ``base``: its base or the base under ``--adapter``s;
    ``adapter``; ``fine-tuned``: a job's; ``served``: a model served as it is), runtime and format,
    and the pair the page compares by default: the base against the tuned model."""
    state, backend = ctx.state, ctx.state.backend
    own = backend.models if backend is not None else {state.model_id: None}
    entries = []
    served = "tuned" if ctx.extra else "served"  # a run is served with its base beside it: the run is the tuned one
    for model, adapter in own.items():
        role = "base" if adapter == "__base__" else "adapter" if adapter else served
        entries.append(_entry(model, role, backend, state.status))
    pooled = [(m, "base") for m in ctx.extra]
    pooled += [(m, "fine-tuned") for m, _ in sorted(tuned.items(), key=lambda kv: -kv[1])]  # newest first
    for model, role in pooled:
        entries.append(_entry(model, role, ctx.pool.loaded_backend(model) if ctx.pool is not None else None))
    return {"models": entries, "compare": default_pair(entries)}


ROLES = ("base", "adapter", "tuned", "served", "fine-tuned")


def default_pair(entries: list[dict[str, Any]]) -> list[str]:
    """Base on the left, tuned on the right: an adapter, else the served model, else the newest fine-tuned
    model; with no base, the served model against the newest fine-tuned one; else the first two."""
    ids = [e["id"] for e in entries]
    by_role = {role: [e["id"] for e in entries if e["role"] == role] for role in ROLES}
    left = (by_role["base"] or by_role["served"] or ids)[0] if ids else ""
    rights = [m for m in by_role["adapter"] + by_role["tuned"] + by_role["served"] + by_role["fine-tuned"] if m != left]
    return [left, rights[0] if rights else left]


@router.get("/ui/models", include_in_schema=False)
async def models(ctx: Annotated[AppContext, Depends(context)]) -> dict[str, Any]:
    return describe(ctx, await asyncio.to_thread(ctx.fine_tuned))
