"""What the HTTP API holds while it runs: its limits, the served model's state, the metrics, and the one
:class:`AppContext` on ``app.state`` that the routes read them from."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from fastapi import Request

from loratui.serving.backends import Backend, Delta
from loratui.serving.errors import ApiError
from loratui.serving.pool import ModelPool


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


def _no_fine_tuned_models() -> dict[str, int]:
    return {}


@dataclass
class AppContext:
    """Everything the routes share, held on ``app.state.loratui``."""

    state: ServerState
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    api_key: str | None = None
    uploads: bool = False  # the files API is on: POST /v1/files has its own size limit
    pool: ModelPool | None = None  # the fine-tuned models, loaded on first use
    # the models fine-tuning jobs made -> when (blocking: call it in a thread)
    fine_tuned: Callable[[], dict[str, int]] = _no_fine_tuned_models
    extra: list[str] = field(default_factory=list)  # served from the pool too: the run's base model
    ui: bool = False  # the chat page at /

    def own(self) -> list[str]:
        """The model ids the server's own backend answers to."""
        return list(self.state.backend.models) if self.state.backend is not None else [self.state.model_id]

    def pooled(self, model: str) -> bool:
        """Whether ``model`` is loaded on first use from the pool (the run's base, a fine-tuned model)."""
        return self.pool is not None and (model in self.extra or (self.uploads and model.startswith("ft:")))

    def enter(self) -> None:
        """Count a generation in, or 429 when the queue is full."""
        state = self.state
        with state.lock:
            if state.in_flight >= self.limits.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy ({state.in_flight} requests running or waiting); retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            state.in_flight += 1

    def leave(self) -> None:
        with self.state.lock:
            self.state.in_flight -= 1


def context(request: Request) -> AppContext:
    """The app's context (a FastAPI dependency)."""
    return cast(AppContext, request.app.state.loratui)
