"""The containers' HEALTHCHECK command: finds `loratui serve`, its port, and asks its /health."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig
from loratui.serving import healthcheck


def _proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()
    return root


@pytest.fixture
def server():
    """A /health endpoint whose status code the test sets."""
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = json.dumps({"status": "ok" if status["code"] == 200 else "loading"}).encode()
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], status
    httpd.shutdown()


def test_the_defaults_are_the_configs():
    assert (healthcheck.DEFAULT_HOST, healthcheck.DEFAULT_PORT) == (RunConfig().serve.host, RunConfig().serve.port)


def test_finds_loratui_serve_among_the_processes(tmp_path):
    proc = _proc(
        tmp_path,
        {
            1: ["/usr/bin/tini", "--", "loratui", "serve", "/work/runs/a", "--port", "9001"],
            7: ["/opt/venv/bin/python", "/opt/venv/bin/loratui", "serve", "--port=9002"],
            30: ["sleep", "10"],
        },
    )
    args, cwd = healthcheck.serve_command(proc)
    assert args == ["/work/runs/a", "--port", "9001"] and cwd == proc / "1" / "cwd"
    assert healthcheck.serve_command(_proc(tmp_path / "p2", {1: ["/opt/venv/bin/loratui", "train"]})) is None
    # `loratui run CONFIG --serve` serves the run of CONFIG once its steps are done
    run = _proc(tmp_path / "p3", {1: ["/opt/venv/bin/loratui", "run", "examples/q.yaml", "lora.r=8", "--serve"]})
    assert healthcheck.serve_command(run)[0] == ["--config", "examples/q.yaml"]
    assert healthcheck.serve_command(_proc(tmp_path / "p4", {1: ["loratui", "run", "q.yaml"]})) is None


def test_the_address_is_found_as_serve_finds_it(tmp_path):
    (tmp_path / "c.yaml").write_text("serve:\n  port: 8123\n  host: 0.0.0.0\n")
    (tmp_path / "other.yaml").write_text("train:\n  lr: 0.001\n")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.yaml").write_text("serve:\n  port: 9300\n  host: 10.1.2.3\n")
    address = healthcheck.serve_address
    assert address(["run", "--port", "9001"], tmp_path) == ("127.0.0.1", 9001)
    assert address(["run", "--port=9002", "--config", "c.yaml"], tmp_path) == ("127.0.0.1", 9002)
    assert address(["--config", "c.yaml"], tmp_path) == ("127.0.0.1", 8123)  # 0.0.0.0 is asked on loopback
    assert address(["-c", str(tmp_path / "c.yaml")], Path("/")) == ("127.0.0.1", 8123)
    # no --config: the served run's own config.yaml, as `loratui serve runs/r` reads it
    assert address(["runs/r"], tmp_path) == ("10.1.2.3", 9300)
    assert address(["--format", "gguf", "runs/r", "--host", "::"], tmp_path) == ("::1", 9300)
    assert address(["--config", "other.yaml", "runs/r"], tmp_path) == ("127.0.0.1", 8000)
    assert address(["-c", "missing.yaml"], tmp_path) == ("127.0.0.1", 8000)
    assert address(["model.gguf"], tmp_path) == ("127.0.0.1", 8000)


def test_healthy_only_when_the_server_says_so(tmp_path, server, capsys):
    port, status = server
    proc = _proc(tmp_path, {1: ["/opt/venv/bin/loratui", "serve", "x.gguf", "--port", str(port)]})
    assert healthcheck.main(proc) == 0
    assert '"status": "ok"' in capsys.readouterr().out
    status["code"] = 503  # still loading, or the model failed
    assert healthcheck.main(proc) == 1
    assert "503" in capsys.readouterr().out


def test_a_server_that_does_not_answer_is_unhealthy(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    proc = _proc(tmp_path, {1: ["loratui", "serve", "--port", str(port)]})
    assert healthcheck.main(proc) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().out


def test_other_commands_have_nothing_to_check(tmp_path, monkeypatch, server):
    assert healthcheck.main(_proc(tmp_path, {1: ["loratui", "train", "--config", "c.yaml"]})) == 0
    port, status = server
    status["code"] = 503
    monkeypatch.setenv("LORATUI_HEALTH_URL", f"http://127.0.0.1:{port}/health")
    assert healthcheck.main(tmp_path) == 1  # an explicit address is always asked
