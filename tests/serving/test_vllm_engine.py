"""loratui's side of the vLLM engine (serving/vllm_engine.py, backends/vllm.py, the server's vLLM choice), against a
stand-in vLLM server (tests/serving/fake_vllm): the command line, finding vLLM, the API in front, runtime LoRA,
health when the engine dies, and no engine process left behind, however the server ends. The real vLLM runs in
tests/serving/test_vllm.py (marked `vllm`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loratui.pipeline.errors import LoratuiError
from loratui.serving import vllm_engine
from loratui.serving.server import ServeOptions, prepare, vllm_choice
from loratui.serving.vllm_engine import EngineSpec, engine_command, find_python, lora_rank
from tests.serving.test_app import Server

FAKE = Path(__file__).parent / "fake_vllm"


def _adapter(path: Path, r: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pids: list[int], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """vLLM's python is this one, with the stand-in `vllm` package on its path."""
    out = tmp_path / "fake-out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_DIR", str(out))
    monkeypatch.setenv(vllm_engine.PYTHON_ENV, sys.executable)
    return out


def _pids(out: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "pids").is_file() and (out / "pids").read_text().strip():
            return [int(p) for p in (out / "pids").read_text().split()]
        time.sleep(0.05)
    raise TimeoutError("the stand-in vLLM did not start")


# ------------------------------------------------------------------------------------------ the command


def test_the_command_has_loratuis_defaults_and_the_users_arguments_win(tmp_path):
    spec = EngineSpec(
        model=tmp_path / "m",
        served_name="quickstart",
        context_length=2048,
        max_num_seqs=8,
        dtype="float32",
        extra=["--max-model-len", "1024", "--tensor-parallel-size", "2"],
    )
    cmd = engine_command("/py", spec, 8123)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "quickstart" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd.count("--max-model-len") == 1 and cmd[cmd.index("--max-model-len") + 1] == "1024"
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--max-num-seqs") + 1] == "8"
    assert cmd[-2:] == ["--tensor-parallel-size", "2"] and "--enable-lora" not in cmd


def test_lora_modules_and_the_smallest_rank_vllm_accepts(tmp_path):
    a, b = _adapter(tmp_path / "a", 8), _adapter(tmp_path / "b", 100)
    assert lora_rank({"a": a}, runtime=False) == 8
    assert lora_rank({"a": a, "b": b}, runtime=False) == 128
    assert lora_rank({}, runtime=True) == vllm_engine.JOB_LORA_RANK
    cmd = engine_command("/py", EngineSpec(tmp_path, "base", 512, adapters={"a": a, "b": b}), 1)
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "128"
    assert cmd[cmd.index("--lora-modules") + 1 :][:2] == [f"a={a}", f"b={b}"]
    with pytest.raises(LoratuiError, match="not a peft LoRA adapter"):
        lora_rank({"x": tmp_path / "missing"}, runtime=False)


def test_a_missing_vllm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(vllm_engine.PYTHON_ENV, raising=False)
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(vllm_engine.sys, "prefix", str(tmp_path / "env" / ".venv"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoratuiError, match="vLLM is not installed") as e:
        find_python()
    assert "make vllm" in (e.value.hint or "")
    with pytest.raises(LoratuiError, match="does not exist"):
        find_python(str(tmp_path / "nope" / "python"))
    with pytest.raises(LoratuiError, match="cannot import vllm"):
        find_python(sys.executable)  # this environment has no vLLM (the stand-in is not on its path here)
    venv = tmp_path / ".venv-vllm" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    monkeypatch.setattr(vllm_engine, "_has_vllm", lambda python: True)
    assert find_python() == str(venv / "python")


def test_what_vllm_serves_from_a_run_or_a_directory(tmp_path):
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    _adapter(run / "adapter", 8)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    choice = vllm_choice(ServeOptions(target=run, base=base))
    assert (choice.path, choice.adapter) == (base, run / "adapter")
    (run / "merged" / "config.json").write_text("{}")
    assert vllm_choice(ServeOptions(target=run)).path == run / "merged"
    assert vllm_choice(ServeOptions(target=base)).path == base
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LoratuiError, match="not a run with a merged model") as e:
        vllm_choice(ServeOptions(target=gguf))
    assert "--engine loratui" in (e.value.hint or "")
    with pytest.raises(LoratuiError, match="--format gguf"):
        vllm_choice(ServeOptions(target=base, fmt="gguf"))


# ------------------------------------------------------------------------------------------ the API in front


def test_the_api_in_front_of_the_engine(tmp_path, tiny_model_factory, fake_vllm):
    from loratui.serving.finetune import JobSettings

    model = tiny_model_factory(tokenizer="smollm2")
    jobs = JobSettings(root=tmp_path / "jobs", runs_dir=tmp_path / "runs", template={}, slots=1, gpus=[])
    opts = ServeOptions(target=model, engine="vllm", model_id="tiny", jobs=jobs, vllm_args=["--seed", "3"])
    state, app = prepare(opts, log=lambda m: None)
    server = Server(app)
    try:
        health = server.wait_ready(60)
        assert health["status"] == "ok" and health["backend"] == "vllm", health
        assert health["engine"]["state"] == "ready"
        argv = json.loads((fake_vllm / "argv.json").read_text())
        assert argv[-2:] == ["--seed", "3"] and "--enable-lora" in argv  # jobs' adapters load at run time
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chat = [{"role": "user", "content": "Where is the library?"}]
        reply = client.chat.completions.create(model="tiny", messages=chat, max_tokens=50, temperature=0)
        sent = json.loads((fake_vllm / "requests.jsonl").read_text().splitlines()[-1])
        # the prompt is loratui's chat template applied by loratui: the same tokens every engine sees
        assert sent["prompt"] == state.backend.chat_prompt(chat)
        assert sent["model"] == "tiny" and sorted(sent["stop_token_ids"]) == sorted(state.backend.stop_ids)
        assert reply.choices[0].message.content.strip() == f"model tiny prompt {len(sent['prompt'])} tokens"
        assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens == len(sent["prompt"])
        short = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
        pieces = [
            c.choices[0].delta.content
            for c in client.chat.completions.create(
                model="tiny", messages=chat, max_tokens=50, temperature=0, stream=True
            )
            if c.choices and c.choices[0].delta.content
        ]
        assert len(pieces) == 5  # streamed as the engine streams
        # a client that hangs up mid-stream: loratui closes its stream to the engine, which aborts the request
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": chat, "max_tokens": 400, "temperature": 1.0, "stream": True},
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while not (fake_vllm / "aborted").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (fake_vllm / "aborted").read_text().split() == ["tiny"]
        # a fine-tuning job's adapter goes into the running engine, and out again when its model is let go
        from loratui.serving.backends.vllm import VllmAdapter

        view = VllmAdapter(state.backend, "ft:tiny:job", _adapter(tmp_path / "job-adapter", 8))
        assert (
            "".join(d.text for d in view.stream(_request(state.backend.chat_prompt(chat))))
            .strip()
            .startswith("model ft:tiny:job")
        )
        view.close()
        assert json.loads((fake_vllm / "requests.jsonl").read_text().splitlines()[-1])["model"] == "ft:tiny:job"
        pids = _pids(fake_vllm)
    finally:
        server.stop()
    assert _gone(pids), "the engine and its child outlived the server"


def _request(ids: list[int]):
    from loratui.serving.backends.base import GenRequest

    return GenRequest(prompt_ids=ids, max_tokens=20, temperature=0)


def test_an_engine_that_exits_makes_health_fail_with_its_log(tiny_model_factory, fake_vllm):
    model = tiny_model_factory(tokenizer="smollm2")
    state, app = prepare(ServeOptions(target=model, engine="vllm", vllm_args=["--fail"]), log=lambda m: None)
    server = Server(app)
    try:
        health = server.wait_ready(60)
        assert health["status"] == "failed" and "vLLM exited with code 3 while starting" in health["reason"]
        assert "failing on purpose" in health["reason"]  # the end of its log, in the reason
    finally:
        server.stop()


def test_a_killed_server_leaves_no_engine_process(tmp_path, tiny_model_factory, fake_vllm):
    model = tiny_model_factory(tokenizer="smollm2")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "loratui", "serve", str(model), "--engine", "vllm", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ["PYTHONPATH"]])},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pids = _pids(fake_vllm)
        assert all(_alive(p) for p in pids)
        server.send_signal(signal.SIGKILL)  # no chance to clean up: Linux tells the watchdog its parent died
        server.wait(timeout=10)
        assert _gone(pids), "vLLM (or its engine process) outlived a killed server"
    finally:
        if server.poll() is None:
            server.kill()


def test_a_jobs_adapter_goes_into_vllm_only_when_it_was_trained_on_what_vllm_serves(tmp_path):
    from types import SimpleNamespace

    from loratui.serving.finetune import JobSettings
    from loratui.serving.server import vllm_can_load

    merged, base = tmp_path / "run" / "merged", tmp_path / "base"
    merged.mkdir(parents=True)
    base.mkdir()
    lora, dora = _adapter(tmp_path / "lora", 8), tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    jobs = JobSettings(root=tmp_path / "jobs", runs_dir=tmp_path / "runs", template={}, slots=1, gpus=[])
    opts = ServeOptions(target=tmp_path / "run", engine="vllm", jobs=jobs)

    def serving(model: Path) -> SimpleNamespace:
        return SimpleNamespace(kind="vllm", engine=SimpleNamespace(spec=EngineSpec(model, "run", 512)))

    assert vllm_can_load(lora, str(merged), opts, serving(merged))
    assert not vllm_can_load(lora, str(merged), opts, serving(base))  # vLLM serves the base (with --adapter)
    assert not vllm_can_load(dora, str(merged), opts, serving(merged))  # vLLM cannot apply DoRA
    assert not vllm_can_load(lora, str(merged), opts, SimpleNamespace(kind="torch"))
    builtin = ServeOptions(target=base, engine="vllm", jobs=jobs, source="smollm2-135m-instruct")
    assert vllm_can_load(lora, "smollm2-135m-instruct", builtin, serving(base))
    assert not vllm_can_load(lora, "other-model", builtin, serving(base))
