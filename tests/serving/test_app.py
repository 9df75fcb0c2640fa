"""The server, started for real on loopback and driven with the official `openai` client, per backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from loratui.serving.app import create_app
from loratui.serving.selection import Choice
from loratui.serving.server import ServeOptions, loader_for
from loratui.serving.state import Limits, ServerState
from tests.threaded_server import ThreadedServer

CHAT = [{"role": "user", "content": "Where is the library?"}]


class Server(ThreadedServer):
    """The app under uvicorn in a thread on a free loopback port."""

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/health")
            if r.status_code == 200 or r.json()["status"] == "failed":
                return r.json()
            time.sleep(0.1)
        raise TimeoutError("the server did not get ready")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_factory):
    """A tiny model with SmolLM2's tokenizer (a chat template) as a directory, an f32 GGUF and an ONNX export."""
    from loratui.exporters.gguf import converter_dir
    from loratui.exporters.onnx import build

    model = tiny_model_factory(tokenizer="smollm2")
    tmp = tmp_path_factory.mktemp("serve")
    gguf = tmp / "tiny-f32.gguf"
    entry = (Path(__file__).parents[2] / "loratui" / "exporters" / "convert_entry.py").read_text()
    subprocess.run(
        [sys.executable, "-c", entry, str(model), "--outfile", str(gguf), "--outtype", "f32"],
        check=True,
        cwd=converter_dir(),
        env={**os.environ, "PYTHONPATH": str(converter_dir())},
        capture_output=True,
    )
    onnx = tmp / "onnx"
    build(model, onnx, "fp32", tmp / "onnx.log", lambda: False, False)
    return {"torch": model, "gguf": gguf, "onnx": onnx}


@pytest.fixture(scope="module", params=["gguf", "torch", "onnx"])
def server(request, artifacts):
    kind = request.param
    state = ServerState(model_id="tiny")
    opts = ServeOptions(target=artifacts[kind], context_length=256)
    srv = Server(
        create_app(
            state,
            limits=Limits(max_tokens=64),
            loader=loader_for(Choice(kind, artifacts[kind], None, "test"), opts, lambda m: None),
        )
    )
    health = srv.wait_ready()
    assert health["status"] == "ok", health
    yield kind, srv, state
    srv.stop()


def test_models_and_health(server):
    kind, srv, _ = server
    assert [m.id for m in srv.client().models.list()] == ["tiny"]
    health = httpx.get(srv.url + "/health").json()
    assert health["backend"] == {"gguf": "llama.cpp", "torch": "torch", "onnx": "onnxruntime"}[kind]


def test_completion_with_usage(server):
    _, srv, _ = server
    out = srv.client().completions.create(model="tiny", prompt="The library opens at", max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 3
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == "tiny"


def test_chat_streaming_equals_chat(server):
    _, srv, _ = server
    client = srv.client()
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, seed=1)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_sequence_cuts_the_reply(server):
    _, srv, _ = server
    client = srv.client()
    free = client.completions.create(model="tiny", prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.find(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Hello", max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut.text  # no part of the stop string was streamed


def test_seeded_sampling_repeats(server):
    _, srv, _ = server
    client = srv.client()
    a = client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_errors_have_openai_shape_and_4xx_codes(server):
    _, srv, _ = server
    client = srv.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        client.completions.create(model="tiny", prompt="word " * 300, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 64"):
        client.completions.create(model="tiny", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, n=2)
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(srv.url + "/nowhere").status_code == 404


def test_metrics_count_requests_and_tokens(server):
    _, srv, _ = server
    srv.client().completions.create(model="tiny", prompt="Count me", max_tokens=3, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    assert 'loratui_requests_total{route="/v1/completions",status="200"}' in text
    completed = float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith("loratui_completion_tokens_total"))
    )
    assert completed >= 3 and "loratui_time_to_first_token_seconds_count" in text and "loratui_queue_depth 0" in text


def test_concurrent_clients_get_their_own_outputs(server):
    _, srv, _ = server
    client = srv.client()
    prompts = [f"Row {i} of the list says" for i in range(6)]
    alone = {
        p: client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in prompts
    }
    together: dict[str, str] = {}

    def ask(p: str) -> None:
        stream = i_stream = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0, stream=True)
        together[p] = "".join(c.choices[0].text for c in i_stream)
        del stream

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert together == alone


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    _, srv, state = server
    with httpx.stream(
        "POST",
        srv.url + "/v1/completions",
        json={"model": "tiny", "prompt": "Go on", "max_tokens": 64, "temperature": 0, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 30
    while state.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.in_flight == 0
    assert (
        srv.client().completions.create(model="tiny", prompt="Still there?", max_tokens=2).choices[0].text is not None
    )


def test_a_hang_up_during_a_send_still_runs_the_streams_cleanup():
    """The race behind a flaky CI run: the client leaves while a chunk is being written, so Starlette
    cancels the send with the generator parked at its ``yield``. The cleanup must run before the
    response returns, not whenever the garbage collector gets to the generator."""
    import asyncio

    from loratui.serving.routes.generation import _EventStream

    cleaned: list[str] = []
    hung_up = asyncio.Event()

    async def body():
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            cleaned.append("done")

    async def send(message):
        if message["type"] == "http.response.body":
            hung_up.set()
            await asyncio.sleep(3600)  # a send stuck on a socket the client no longer reads

    async def receive():
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def main():
        stream = _EventStream(body(), media_type="text/event-stream")
        await asyncio.wait_for(stream({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 10)
        assert cleaned == ["done"]  # while the response (and so its generator) is still referenced

    asyncio.run(main())


def test_api_key_and_loading_state(artifacts):
    gate = threading.Event()
    inner = loader_for(
        Choice("gguf", artifacts["gguf"], None, "test"), ServeOptions(target=artifacts["gguf"]), lambda m: None
    )

    def slow_loader(state: ServerState) -> None:
        gate.wait(30)
        inner(state)

    state = ServerState(model_id="tiny")
    srv = Server(create_app(state, api_key="sekret", loader=slow_loader))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        gate.set()
        assert srv.wait_ready()["status"] == "ok"
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert [m.id for m in srv.client("sekret").models.list()] == ["tiny"]
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
    finally:
        srv.stop()


def test_a_broken_adapter_falls_back_to_the_base_unless_strict(artifacts, tmp_path):
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    choice = Choice("torch", artifacts["torch"], broken, "test")
    logs: list[str] = []
    state = ServerState(model_id="tiny")
    loader_for(choice, ServeOptions(target=artifacts["torch"]), logs.append)(state)
    assert state.status == "degraded" and "failed to load" in state.reason and state.backend is not None
    state.backend.close()
    strict = ServerState(model_id="tiny")
    loader_for(choice, ServeOptions(target=artifacts["torch"], strict=True), logs.append)(strict)
    assert strict.status == "failed" and strict.backend is None


def test_a_public_address_needs_a_key(tmp_path):
    from loratui.pipeline.errors import LoratuiError
    from loratui.serving.server import check_security

    with pytest.raises(LoratuiError, match="no API key"):
        check_security(ServeOptions(target=tmp_path, host="0.0.0.0"))
    check_security(ServeOptions(target=tmp_path, host="0.0.0.0", api_key="k"))
    check_security(ServeOptions(target=tmp_path, host="0.0.0.0", allow_unauthenticated=True))
    check_security(ServeOptions(target=tmp_path, host="127.0.0.1"))


def test_the_backends_agree_on_greedy_text(artifacts):
    """The same tiny f32 model in llama.cpp, PyTorch and ONNX Runtime: the same greedy reply."""
    from loratui.serving.backends import GenRequest, LlamaCppBackend, OnnxBackend, TorchBackend

    backends = [
        LlamaCppBackend(artifacts["gguf"], "t", 256),
        TorchBackend(artifacts["torch"], "t", 256),
        OnnxBackend(artifacts["onnx"], "t", 256),
    ]
    try:
        replies = [
            "".join(d.text for d in b.stream(GenRequest(b.chat_prompt(CHAT), 12, temperature=0))) for b in backends
        ]
        prompts = [b.chat_prompt(CHAT) for b in backends]
    finally:
        for b in backends:
            b.close()
    assert prompts[0] == prompts[1] == prompts[2]
    assert replies[0] == replies[1] == replies[2] and replies[0]


def test_the_serve_and_generate_commands(artifacts, tmp_path):
    """`loratui serve` as a user starts it (a subprocess), and `loratui generate` on the same file."""
    import json

    repo = Path(__file__).parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratui", "serve", str(artifacts["gguf"]), "--port", str(port), "--model-name", "tiny"],
        cwd=repo,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3).usage.completion_tokens <= 3
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    assert "llama.cpp" in err and "is a GGUF file" in err  # what it chose, and why
    refused = subprocess.run(
        [sys.executable, "-m", "loratui", "serve", str(artifacts["gguf"]), "--host", "0.0.0.0"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "LORATUI_API_KEY": ""},
    )
    assert refused.returncode == 2 and "no API key" in refused.stderr
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loratui",
            "generate",
            str(artifacts["gguf"]),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--max-tokens",
            "4",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2 and "generated 2 rows" in done.stderr


def _random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random, non-zero B (so it changes the model), saved like a trained one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(out))
    return out


def test_several_adapters_side_by_side(artifacts, tmp_path):
    """`--adapter a=... --adapter b=...`: one model id each plus the base; mixed batches give each row its adapter."""
    from loratui.serving.backends import GenRequest, TorchBackend

    base = artifacts["torch"]
    paths = {name: _random_adapter(base, tmp_path / name, seed) for seed, name in enumerate(("a", "b"))}
    broken = tmp_path / "c"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    state = ServerState(model_id="tiny")
    opts = ServeOptions(target=base, context_length=256, adapters={**paths, "c": broken})
    srv = Server(create_app(state, loader=loader_for(Choice("torch", base, None, "test"), opts, lambda m: None)))
    try:
        health = srv.wait_ready()
        assert health["status"] == "degraded" and "adapter c failed to load" in health["reason"]
        client = srv.client()
        assert sorted(m.id for m in client.models.list()) == ["a", "b", "tiny"]
        prompts = {m: f"Tell me about {m}" for m in ("a", "b", "tiny")}
        together: dict[str, str] = {}

        def ask(model: str) -> None:
            together[model] = (
                client.completions.create(model=model, prompt=prompts[model], max_tokens=10, temperature=0)
                .choices[0]
                .text
            )

        threads = [threading.Thread(target=ask, args=(m,)) for m in prompts for _ in range(1)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
    finally:
        srv.stop()
    alone = {}
    for model, adapter in (("a", paths["a"]), ("b", paths["b"]), ("tiny", None)):
        backend = TorchBackend(base, model, 256, adapter=adapter)
        try:
            alone[model] = "".join(
                d.text for d in backend.stream(GenRequest(backend.encode(prompts[model]), 10, temperature=0))
            )
        finally:
            backend.close()
    assert together == alone
    assert len({alone["a"], alone["b"], alone["tiny"]}) == 3  # the adapters do change the model
