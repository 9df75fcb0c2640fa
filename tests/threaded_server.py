"""Real servers on free loopback ports for tests, benches and scripts: an ASGI app under uvicorn in a thread
(:class:`ThreadedServer`), or the ``loratui serve`` command in a child process (:func:`loratui_serve`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn in a daemon thread on a free loopback port: ``url`` once started, ``stop()`` to end it."""

    def __init__(self, app: Any, path: str = ""):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def loratui_serve(
    args: list[str], log: Path, *, cwd: Path | None = None, timeout: float = 120, ready: tuple[str, ...] = ("ok",)
) -> Iterator[str]:
    """``loratui serve ARGS --port P`` in a child process (its output in ``log``), yielding its URL once ``/health``
    says one of ``ready``; terminated on exit. A server that exits or never gets ready raises with its log."""
    import httpx

    port = free_port()
    with log.open("w") as out:
        command = [sys.executable, "-m", "loratui", "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"loratui serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health").json().get("status") in ready:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"loratui serve was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
