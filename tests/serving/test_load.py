"""A bounded load test: 400 requests from 16 concurrent clients, half streaming, some hanging up mid-stream."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loratui.serving.app import create_app
from loratui.serving.selection import Choice
from loratui.serving.server import ServeOptions, loader_for
from loratui.serving.state import Limits, ServerState
from tests.serving.test_app import CHAT, Server, artifacts  # noqa: F401  (artifacts: a fixture)


def _one(url: str, i: int) -> tuple[int, str]:
    """One request; returns (status, what happened): ok, cancelled, or why it is malformed."""
    rng = random.Random(i)
    chat = rng.random() < 0.5
    body = {
        "model": "tiny",
        "max_tokens": rng.randint(1, 24),
        "temperature": rng.choice([0, 0.8]),
        "seed": i,
        **({"messages": CHAT} if chat else {"prompt": f"Request {i} asks"}),
    }
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if i % 2:
        r = httpx.post(url + path, json=body, timeout=120)
        if r.status_code != 200:
            return r.status_code, r.text
        data = r.json()
        text = data["choices"][0]["message"]["content"] if chat else data["choices"][0]["text"]
        ok = isinstance(text, str) and data["usage"]["completion_tokens"] <= body["max_tokens"]
        return 200, "ok" if ok else f"malformed: {data}"
    hang_up = i % 10 == 0
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        done = False
        for line in r.iter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return 200, f"malformed line {line!r}"
            if line == "data: [DONE]":
                done = True
                break
            json.loads(line[6:])
            if hang_up:
                return 200, "cancelled"
        return 200, "ok" if done else "no [DONE]"


@pytest.mark.parametrize("kind", ["gguf", "torch"])
def test_400_requests_from_16_clients(artifacts, kind):  # noqa: F811
    state = ServerState(model_id="tiny")
    srv = Server(
        create_app(
            state,
            limits=Limits(max_tokens=64, max_queue=64),
            loader=loader_for(
                Choice(kind, artifacts[kind], None, "test"),
                ServeOptions(target=artifacts[kind], context_length=256),
                lambda m: None,
            ),
        )
    )
    try:
        assert srv.wait_ready()["status"] == "ok"
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: _one(srv.url, i), range(400)))
        statuses = [s for s, _ in results]
        assert all(s < 500 for s in statuses), [r for r in results if r[0] >= 500][:3]
        assert statuses.count(200) == 400, [r for r in results if r[0] != 200][:3]
        outcomes = [what for _, what in results]
        assert outcomes.count("cancelled") == 40 and outcomes.count("ok") == 360, [
            o for o in outcomes if o not in ("ok", "cancelled")
        ][:3]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        metrics = httpx.get(srv.url + "/metrics").text
        assert not [line for line in metrics.splitlines() if "/v1/" in line and 'status="5' in line]
    finally:
        srv.stop()


def test_a_full_queue_answers_429(artifacts):  # noqa: F811
    state = ServerState(model_id="tiny")
    srv = Server(
        create_app(
            state,
            limits=Limits(max_tokens=64, max_queue=2),
            loader=loader_for(
                Choice("gguf", artifacts["gguf"], None, "test"),
                ServeOptions(target=artifacts["gguf"], context_length=256),
                lambda m: None,
            ),
        )
    )
    try:
        assert srv.wait_ready()["status"] == "ok"
        barrier = threading.Barrier(8)

        def ask(i: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(
                srv.url + "/v1/completions",
                timeout=120,
                json={"model": "tiny", "prompt": f"Busy {i}", "max_tokens": 64, "temperature": 0},
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        busy = next(r for r in responses if r.status_code == 429).json()["error"]
        assert busy["type"] == "rate_limit_error" and busy["code"] == "queue_full"
        assert state.in_flight == 0
    finally:
        srv.stop()
