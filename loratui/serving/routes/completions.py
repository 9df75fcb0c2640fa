"""``POST /v1/completions`` and ``POST /v1/chat/completions``: the prompt as token ids, checked against the
limits and the model's context, then generated (:mod:`loratui.serving.routes.generation`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from loratui.serving.backends import Backend, GenRequest
from loratui.serving.errors import ApiError
from loratui.serving.routes.bodies import ChatRequest, CompletionRequest, SamplingRequest, text_of
from loratui.serving.routes.generation import respond
from loratui.serving.state import AppContext, context

router = APIRouter()


def _nothing() -> None:
    pass


async def _backend(ctx: AppContext, model: str) -> tuple[Backend, Callable[[], None]]:
    """The backend serving ``model`` and what to call when the request is done with it."""
    if model in ctx.own():
        if ctx.state.backend is None:
            raise ApiError(
                503, f"the model is {ctx.state.status}: {ctx.state.reason or 'try again shortly'}", "server_error"
            )
        return ctx.state.backend, _nothing
    if ctx.pool is not None and ctx.pooled(model):
        try:
            return await asyncio.to_thread(ctx.pool.acquire, model)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a model that does not load is the server's problem
            raise ApiError(
                503, f"the model `{model}` failed to load: {type(e).__name__}: {e}", "server_error"
            ) from None
    served = ctx.own() + ctx.extra + list(await asyncio.to_thread(ctx.fine_tuned))
    raise ApiError(
        404,
        f"The model `{model}` does not exist: this server serves " + ", ".join(f"`{m}`" for m in served) + ".",
        param="model",
        code="model_not_found",
    )


def _request(
    ctx: AppContext, body: SamplingRequest, backend: Backend, prompt_ids: list[int], max_tokens: int | None
) -> GenRequest:
    """The backend's request, or 400 when it asks for more tokens than the limit or the context allow."""
    limit = ctx.limits.max_tokens
    wanted = max_tokens if max_tokens is not None else min(limit, backend.context_length - len(prompt_ids))
    if wanted > limit:
        raise ApiError(400, f"max_tokens: {wanted} is over this server's limit of {limit}", param="max_tokens")
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


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: Annotated[AppContext, Depends(context)]) -> Any:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: exactly one prompt per request (send several requests)", param="prompt")
    backend, release = await _backend(ctx, body.model)
    try:
        ids = await asyncio.to_thread(backend.encode, prompts[0])
        req = _request(ctx, body, backend, ids, body.max_tokens)
    except BaseException:
        release()
        raise
    return await respond(ctx, body, backend, req, "completion", request, release)


async def _chat_prompt(backend: Backend, messages: list[dict[str, Any]]) -> list[int]:
    """The conversation through the model's chat template, or 400 when it has none or rejects it."""
    try:
        return await asyncio.to_thread(backend.chat_prompt, messages)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    except Exception as e:  # a template that rejects this conversation (roles out of order ...)
        raise ApiError(400, f"messages: the chat template rejected this conversation: {e}", param="messages") from None


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, ctx: Annotated[AppContext, Depends(context)]) -> Any:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)} for m in body.messages
    ]
    backend, release = await _backend(ctx, body.model)
    try:
        ids = await _chat_prompt(backend, messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        req = _request(ctx, body, backend, ids, limit)
    except BaseException:
        release()
        raise
    return await respond(ctx, body, backend, req, "chat", request, release)
