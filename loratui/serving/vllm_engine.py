"""vLLM's OpenAI server as loratui's engine (``serve.engine: vllm``): where vLLM is installed, how it is started
and stopped, and its runtime LoRA loading.

vLLM pins its own torch, transformers, fastapi and numpy, so it usually lives in an environment of its own
(``make vllm`` makes ``.venv-vllm`` from ``requirements-vllm.txt``); loratui never imports it, it starts
``python -m vllm.entrypoints.openai.api_server`` with that environment's Python on a loopback port and talks
to it over HTTP (:class:`loratui.serving.backends.vllm.VllmBackend`). loratui's own API stays in front.

No vLLM process outlives the server: vLLM runs under a small watchdog (:data:`WATCHDOG`, run by vLLM's
Python, in a process group of its own) that on SIGTERM stops vLLM, waits a grace period and kills the whole
group (vLLM's engine-core and worker processes included). loratui sends it SIGTERM on close, and Linux sends
it SIGTERM when the server dies (``parent_death``), killed or not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.process import Supervised

PYTHON_ENV = "LORATUI_VLLM_PYTHON"
VENV_NAME = ".venv-vllm"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
JOB_LORA_RANK = 64  # room for the adapters fine-tuning jobs make while the engine runs
READY_TIMEOUT_S = 900.0

# Run by vLLM's Python: start vLLM in this process group; on SIGTERM or SIGINT, pass it on, wait
# ``grace`` seconds, then SIGKILL the group (this watchdog included). argv: grace, then vLLM's command.
WATCHDOG = (
    "import os, signal, subprocess, sys, time\n"
    "grace = float(sys.argv[1])\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "def stop(signum, frame):\n"
    "    try:\n"
    "        child.send_signal(signal.SIGTERM)\n"
    "        child.wait(timeout=grace)\n"
    "    except Exception:\n"
    "        pass\n"
    "    os.killpg(0, signal.SIGKILL)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "signal.signal(signal.SIGINT, stop)\n"
    "code = child.wait()\n"
    "print(f'loratui: vLLM exited with code {code}', flush=True)\n"
    "os.killpg(0, signal.SIGKILL)\n"  # what it left behind, and this watchdog
)


def _has_vllm(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_python(setting: str | None = None) -> str:
    """The Python that runs vLLM: ``serve.vllm_python``, else ``$LORATUI_VLLM_PYTHON``, else this environment
    when it has vLLM, else ``.venv-vllm`` beside this environment or in the working directory."""
    named = setting or os.environ.get(PYTHON_ENV)
    if named:
        if not Path(named).is_file() and not _which(named):
            raise LoratuiError(
                f"serve.vllm_python: {named} does not exist",
                hint="Give the python of the environment vLLM is installed in (`make vllm` makes .venv-vllm).",
            )
        if not _has_vllm(named):
            raise LoratuiError(
                f"{named} cannot import vllm", hint="Install vLLM into that environment, or run `make vllm`."
            )
        return named
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path(sys.prefix).parent, Path.cwd()):
        python = root / VENV_NAME / "bin" / "python"
        if python.is_file() and _has_vllm(str(python)):
            return str(python)
    raise LoratuiError(
        "serve.engine is vllm, but vLLM is not installed",
        hint=f"Run `make vllm` (an environment of its own, {VENV_NAME}), or set serve.vllm_python / {PYTHON_ENV} "
        "to the python of an environment that has vLLM.",
    )


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def lora_rank(adapters: dict[str, Path], runtime: bool) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds every adapter (and jobs' adapters if ``runtime``)."""
    needed = JOB_LORA_RANK if runtime else 0
    for path in adapters.values():
        try:
            needed = max(needed, int(json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["r"]))
        except (OSError, ValueError, KeyError) as e:
            raise LoratuiError(f"{path}: not a peft LoRA adapter ({e})") from e
    return next((r for r in LORA_RANKS if r >= needed), LORA_RANKS[-1]) if needed else 0


@dataclass
class EngineSpec:
    """What vLLM serves and how."""

    model: Path  # the Hugging Face directory vLLM loads: a merged model or the base
    served_name: str  # vLLM's name for the model itself
    context_length: int
    max_num_seqs: int = 8
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA modules loaded at start, by name
    runtime_lora: bool = False  # adapters may be loaded while it runs (fine-tuning jobs)
    dtype: str | None = None  # None: vLLM's own choice
    threads: int | None = None
    extra: list[str] = field(default_factory=list)  # serve.vllm_args, passed as they are

    @property
    def lora(self) -> bool:
        return bool(self.adapters) or self.runtime_lora


def engine_command(python: str, spec: EngineSpec, port: int) -> list[str]:
    """vLLM's OpenAI server for ``spec`` on 127.0.0.1:``port``; ``serve.vllm_args`` come last and win."""
    given = {a.split("=", 1)[0] for a in spec.extra if a.startswith("--")}
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(spec.model),
        "--served-model-name",
        spec.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    defaults: list[tuple[str, str | None]] = [
        ("--max-model-len", str(spec.context_length)),
        ("--max-num-seqs", str(spec.max_num_seqs)),
        ("--dtype", spec.dtype),
        ("--generation-config", "auto"),
    ]
    if spec.lora:
        defaults += [
            ("--enable-lora", ""),
            ("--max-lora-rank", str(lora_rank(spec.adapters, spec.runtime_lora))),
            ("--max-loras", str(max(1, len(spec.adapters)) + (1 if spec.runtime_lora else 0))),
        ]
    for flag, value in defaults:
        if value is None or flag in given:
            continue
        cmd += [flag] if value == "" else [flag, value]
    if spec.adapters and "--lora-modules" not in given:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in spec.adapters.items())]
    return cmd + list(spec.extra)


def engine_env(spec: EngineSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if spec.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU (vLLM's default is sized for servers)
    if spec.threads:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{spec.threads - 1}")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VllmEngine:
    """One vLLM server: started by :meth:`start` (or one already running at ``url``), stopped by :meth:`close`."""

    def __init__(self, spec: EngineSpec, python: str | None = None, url: str | None = None, grace_s: float = 15.0):
        self.spec = spec
        self.python = python
        self.external = url is not None
        self.url = (url or "").rstrip("/")
        self.grace_s = grace_s
        self.proc: Supervised | None = None
        self.log_path: Path | None = None
        self.exit_code: int | None = None
        self.state = "starting"  # starting, ready, exited, stopped
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------------------ lifetime

    def start(self, log: Callable[[str], None] = print) -> VllmEngine:
        """Start vLLM (from a thread that lives as long as it: Linux signals the child when the thread that
        started it ends)."""
        if self.external:
            return self
        assert self.python is not None
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = engine_command(self.python, self.spec, port)
        fd, name = tempfile.mkstemp(prefix=f"loratui-vllm-{port}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        log(f"serve: starting vLLM ({' '.join(cmd[1:])}); its log: {self.log_path}")
        threading.Thread(target=self._run, args=(cmd,), name="vllm-engine", daemon=True).start()
        self._started.wait()
        if self._start_error is not None:
            raise LoratuiError(f"vLLM could not be started: {self._start_error}")
        return self

    def _run(self, cmd: list[str]) -> None:
        assert self.python is not None and self.log_path is not None
        try:
            self.proc = Supervised(
                [self.python, "-c", WATCHDOG, str(self.grace_s), *cmd],
                env=engine_env(self.spec),
                output=self.log_path,
                parent_death=signal.SIGTERM,
            ).start()
        except OSError as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        self.exit_code = self.proc.wait()
        said = [ln for ln in self.log_tail(5).splitlines() if ln.startswith("loratui: vLLM exited with code ")]
        if said:  # the watchdog ends itself with SIGKILL; vLLM's own exit code is the one it printed
            self.exit_code = int(said[-1].rsplit(" ", 1)[1])
        if self.state != "stopped":
            self.state = "exited"

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, poll_s: float = 0.5) -> None:
        """Until vLLM's /health answers 200; raises with the end of its log if it exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state in ("exited", "stopped"):
                raise RuntimeError(f"vLLM exited with code {self.exit_code} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.state = "ready"
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        raise RuntimeError(f"vLLM did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.external or (self.proc is not None and self.proc.running)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> dict[str, Any]:
        """For /health: the engine's state, where it listens, its log."""
        state = self.state if self.alive() or self.state == "stopped" else "exited"
        out: dict[str, Any] = {"name": "vllm", "state": state, "url": self.url}
        if self.log_path is not None:
            out["log"] = str(self.log_path)
        if state == "exited":
            out["exit_code"] = self.exit_code
        return out

    def close(self) -> None:
        if self.external or self.proc is None:
            self.state = "stopped"
            return
        self.state = "stopped"
        if self.proc.running:
            self.proc.cancel(grace_s=self.grace_s + 5)
            try:
                self.proc.wait(timeout=self.grace_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    # ------------------------------------------------------------------------------ LoRA at run time

    def load_adapter(self, name: str, path: Path) -> None:
        """vLLM's runtime LoRA loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, f"load the adapter {name}")

    def unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"unload the adapter {name}")

    def _post(self, route: str, body: dict[str, Any], what: str) -> None:
        import httpx

        r = httpx.post(self.url + route, json=body, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"vLLM could not {what}: HTTP {r.status_code} {r.text[:500]}")
