"""The OpenAI-compatible HTTP API (FastAPI) over one :class:`~loratui.serving.backends.Backend`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events, ``stream_options.include_usage``), ``GET /health`` (503 while loading, 200 when
ready or degraded) and ``GET /metrics`` (Prometheus text). With a :class:`~loratui.serving.jobs.JobManager`,
also the files and fine-tuning jobs API (:mod:`loratui.serving.jobs_api`); the models its jobs make are
listed in ``/v1/models`` and served from a :class:`~loratui.serving.pool.ModelPool`, loaded on first use.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON,
missing or out-of-range fields and prompts past the context, 401 for a bad key, 404 for an unknown
model or route, 413 for a body over the limit, 429 when the queue is full. A client error never
yields a 5xx. A client that disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratui.serving.backends import Backend, Delta, GenRequest
from loratui.serving.errors import ApiError

if TYPE_CHECKING:
    from loratui.serving.finetune import JobManager
    from loratui.serving.pool import ModelPool


class _EventStream(StreamingResponse):
    """A streaming response that always closes its generator, so the generator's ``finally`` runs now.

    Starlette cancels the stream when the client hangs up. If that lands while a chunk is being sent,
    the generator is left suspended at its ``yield`` and its cleanup (cancel the generation, leave the
    queue) would wait for garbage collection; closing it here makes that cleanup prompt.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


@dataclass
class Limits:
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests running or waiting; more get 429
    max_upload_bytes: int = 512 << 20  # POST /v1/files


@dataclass
class ServerState:
    """What /health reports; the backend arrives when loaded."""

    model_id: str
    backend: Backend | None = None
    status: Literal["loading", "ok", "degraded", "failed"] = "loading"
    reason: str | None = None
    chosen: str | None = None  # what was chosen to serve, and why
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Metrics:
    """Counters and sums for /metrics (Prometheus text format, no client library needed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.gen_seconds = 0.0

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def finished(self, last: Delta, seconds: float) -> None:
        with self.lock:
            self.prompt_tokens += last.prompt_tokens
            self.completion_tokens += last.completion_tokens
            self.gen_seconds += seconds
            if last.first_token_s is not None:
                self.ttft_sum += last.first_token_s
                self.ttft_count += 1

    def render(self, state: ServerState) -> str:
        with self.lock:
            lines = [
                "# HELP loratui_requests_total HTTP requests by route and status.",
                "# TYPE loratui_requests_total counter",
            ]
            lines += [
                f'loratui_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())
            ]
            rate = self.completion_tokens / self.gen_seconds if self.gen_seconds else 0.0
            lines += [
                "# HELP loratui_prompt_tokens_total Prompt tokens processed.",
                "# TYPE loratui_prompt_tokens_total counter",
                f"loratui_prompt_tokens_total {self.prompt_tokens}",
                "# HELP loratui_completion_tokens_total Tokens generated.",
                "# TYPE loratui_completion_tokens_total counter",
                f"loratui_completion_tokens_total {self.completion_tokens}",
                "# HELP loratui_time_to_first_token_seconds Time from request to first token.",
                "# TYPE loratui_time_to_first_token_seconds summary",
                f"loratui_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"loratui_time_to_first_token_seconds_count {self.ttft_count}",
                "# HELP loratui_generation_tokens_per_second Generated tokens per second of request time, overall.",
                "# TYPE loratui_generation_tokens_per_second gauge",
                f"loratui_generation_tokens_per_second {rate:.3f}",
                "# HELP loratui_queue_depth Requests running or waiting.",
                "# TYPE loratui_queue_depth gauge",
                f"loratui_queue_depth {state.in_flight}",
            ]
        return "\n".join(lines) + "\n"


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


# --------------------------------------------------------------------------------------------
# Request bodies (the OpenAI fields loratui honours; unknown fields are ignored, as OpenAI does)
# --------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        return stops


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _text_of(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(
                400,
                f"messages: content parts of type {part.get('type')!r} are not supported (text only)",
                param="messages",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/v1/files",
    "/v1/fine_tuning/jobs",
)


def _route_label(path: str) -> str:
    for route in ROUTES:
        if path == route or (route in ("/v1/files", "/v1/fine_tuning/jobs") and path.startswith(route + "/")):
            return route
    return "other"


def create_app(
    state: ServerState,
    api_key: str | None = None,
    limits: Limits | None = None,
    loader: Callable[[ServerState], None] | None = None,
    jobs: JobManager | None = None,
    pool: ModelPool | None = None,
) -> FastAPI:
    """The app; ``loader(state)`` runs in a thread at start-up and fills ``state.backend``. ``jobs``: also the
    fine-tuning API, its models served from ``pool``."""
    limits = limits or Limits()
    metrics = Metrics()

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
    app.state.loratui = state

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        route = request.url.path
        length = request.headers.get("content-length")
        upload = jobs is not None and route == "/v1/files" and request.method == "POST"  # its own limit
        if length and length.isdigit() and int(length) > limits.max_body_bytes and not upload:
            response = _error(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}")
        elif api_key and route != "/health" and not _authorized(request, api_key):
            response = _error(
                401, "Incorrect API key provided: send it as `Authorization: Bearer <key>`.", code="invalid_api_key"
            )
        else:
            response = await call_next(request)
        metrics.request(_route_label(route), response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(
            exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error"
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": state.status,
            "model": state.model_id,
            "backend": state.backend.kind if state.backend else None,
            "serving": state.chosen,
        }
        if state.reason:
            body["reason"] = state.reason
        return JSONResponse(body, status_code=200 if state.status in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(state), media_type="text/plain; version=0.0.4")

    def own() -> list[str]:
        return list(state.backend.models) if state.backend is not None else [state.model_id]

    def fine_tuned() -> dict[str, int]:
        return jobs.fine_tuned_models() if jobs is not None else {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        tuned = await asyncio.to_thread(fine_tuned)
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "loratui"} for m in own()]
            + [{"id": m, "object": "model", "created": t, "owned_by": "loratui-fine-tuning"} for m, t in tuned.items()],
        }

    def _nothing() -> None:
        pass

    async def _backend(model: str) -> tuple[Backend, Callable[[], None]]:
        """The backend serving ``model`` and what to call when the request is done with it."""
        if model in own():
            if state.backend is None:
                raise ApiError(
                    503, f"the model is {state.status}: {state.reason or 'try again shortly'}", "server_error"
                )
            return state.backend, _nothing
        if pool is not None and model.startswith("ft:"):
            try:
                return await asyncio.to_thread(pool.acquire, model)
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 - a model that does not load is the server's problem
                raise ApiError(
                    503, f"the model `{model}` failed to load: {type(e).__name__}: {e}", "server_error"
                ) from None
        served = own() + list(await asyncio.to_thread(fine_tuned))
        raise ApiError(
            404,
            f"The model `{model}` does not exist: this server serves " + ", ".join(f"`{m}`" for m in served) + ".",
            param="model",
            code="model_not_found",
        )

    def _request(body: _SamplingRequest, backend: Backend, prompt_ids: list[int], max_tokens: int | None) -> GenRequest:
        wanted = (
            max_tokens if max_tokens is not None else min(limits.max_tokens, backend.context_length - len(prompt_ids))
        )
        if wanted > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens: {wanted} is over this server's limit of {limits.max_tokens}", param="max_tokens"
            )
        if len(prompt_ids) + max(wanted, 1) > backend.context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {backend.context_length} tokens. However, you "
                f"requested {len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the prompt, {wanted} "
                "for the completion). Please reduce the prompt or the completion length.",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        return GenRequest(
            prompt_ids,
            max(wanted, 1),
            body.temperature,
            body.top_p,
            body.stops(),
            body.seed,
            adapter=backend.models.get(body.model),
        )

    def _enter() -> None:
        with state.lock:
            if state.in_flight >= limits.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy ({state.in_flight} requests running or waiting); retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            state.in_flight += 1

    def _leave() -> None:
        with state.lock:
            state.in_flight -= 1

    async def _respond(
        body: _SamplingRequest,
        backend: Backend,
        req: GenRequest,
        kind: str,
        request: Request,
        release: Callable[[], None],
    ) -> Any:
        """Generate for ``req``; ``release`` (the backend is no longer needed) is called once generation ended."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        try:
            _enter()
        except BaseException:
            release()
            raise
        started = time.monotonic()
        deltas: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def work() -> None:
            gen = None
            try:
                gen = backend.stream(req)
                for d in gen:
                    loop.call_soon_threadsafe(deltas.put_nowait, d)
            except BaseException as e:  # reported to the client as a server error
                loop.call_soon_threadsafe(deltas.put_nowait, e)
            finally:
                close = getattr(gen, "close", None)  # a generator: end it here, on the thread that ran it
                if close is not None:
                    close()
                release()  # only now: a pooled model may be unloaded, never under a generation
                loop.call_soon_threadsafe(deltas.put_nowait, None)

        threading.Thread(target=work, name=rid, daemon=True).start()

        def usage(last: Delta) -> dict[str, int]:
            return {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens,
            }

        def finish(reason: str | None) -> str:
            return "stop" if reason in ("stop", "cancelled") else (reason or "length")

        if not body.stream:
            try:
                text, last = [], Delta()
                while (item := await deltas.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    text.append(item.text)
                    last = item
                    if await request.is_disconnected():
                        req.cancelled.set()
            finally:
                _leave()
            if last.finish_reason and last.finish_reason.startswith("error"):
                raise RuntimeError(last.finish_reason)
            metrics.finished(last, time.monotonic() - started)
            content = "".join(text)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish(last.finish_reason),
                    "logprobs": None,
                }
                if kind == "chat"
                else {"index": 0, "text": content, "finish_reason": finish(last.finish_reason), "logprobs": None}
            )
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage(last),
                "system_fingerprint": f"loratui-{backend.kind}",
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if kind == "chat":
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                )
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            payload: dict[str, Any] = {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "system_fingerprint": f"loratui-{backend.kind}",
            }
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> Any:
            last = Delta()
            try:
                if kind == "chat":
                    yield chunk(None, None, role=True)
                while (item := await deltas.get()) is not None:
                    # the stream is already 200: a failure goes in an error event
                    if isinstance(item, BaseException) or (item.finish_reason or "").startswith("error"):
                        yield (
                            "data: "
                            + json.dumps(
                                {
                                    "error": {
                                        "message": "generation failed",
                                        "type": "server_error",
                                        "param": None,
                                        "code": None,
                                    }
                                }
                            )
                            + "\n\n"
                        )
                        return
                    last = item
                    if item.finish_reason:
                        if item.text:
                            yield chunk(item.text, None)
                        yield chunk(None, finish(item.finish_reason))
                    elif item.text:
                        yield chunk(item.text, None)
                metrics.finished(last, time.monotonic() - started)
                if include_usage:
                    payload = {
                        "id": rid,
                        "object": chunk_obj,
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage(last),
                    }
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: stop generating for it
                req.cancelled.set()
                _leave()

        return _EventStream(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request (send several requests)", param="prompt")
        backend, release = await _backend(body.model)
        try:
            ids = await asyncio.to_thread(backend.encode, prompts[0])
            req = _request(body, backend, ids, body.max_tokens)
        except BaseException:
            release()
            raise
        return await _respond(body, backend, req, "completion", request, release)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
            for m in body.messages
        ]
        backend, release = await _backend(body.model)
        try:
            try:
                ids = await asyncio.to_thread(backend.chat_prompt, messages)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            except Exception as e:  # a template that rejects this conversation (roles out of order ...)
                raise ApiError(
                    400, f"messages: the chat template rejected this conversation: {e}", param="messages"
                ) from None
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            req = _request(body, backend, ids, limit)
        except BaseException:
            release()
            raise
        return await _respond(body, backend, req, "chat", request, release)

    if jobs is not None:
        from loratui.serving.finetune.routes import add_routes

        add_routes(app, jobs, limits.max_upload_bytes)
    return app


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
