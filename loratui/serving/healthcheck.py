"""The containers' health check: ``python -m loratui.serving.healthcheck`` (Dockerfiles' ``HEALTHCHECK``).

When the container runs ``loratui serve``, the check asks that server's ``/health`` on 127.0.0.1 and the
port its command line (``--port``) or its config (``serve.port`` of ``--config``) names, and passes only
when the model is loaded (200). A container running any other step (train, export ...) has no server to
ask and passes: Docker health means "serving" only for the serving command. ``LORATUI_HEALTH_URL``
overrides the address. Standard library and PyYAML only, so it answers in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8000  # ServeConfig.port's default; tests check they agree


def serve_command(proc: Path = Path("/proc")) -> tuple[list[str], Path] | None:
    """(the arguments after ``serve``, its working directory) of a running ``loratui serve``, or None."""
    for entry in sorted(proc.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone since the listing, or not ours to read
            continue
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "loratui" and argv[i + 1] == "serve":
                return [a for a in argv[i + 2:] if a], entry / "cwd"
    return None


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def serve_port(args: list[str], cwd: Path = Path(".")) -> int:
    """The port ``loratui serve ARGS`` listens on: --port, else the config's serve.port, else the default."""
    port = _option(args, "--port")
    if port is None:
        config = _option(args, "--config", "-c")
        if config:
            import yaml

            try:
                data = yaml.safe_load((cwd / config).read_text()) or {}
                port = (data.get("serve") or {}).get("port")
            except (OSError, yaml.YAMLError, AttributeError):
                port = None
    return int(port) if port is not None else DEFAULT_PORT


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """(healthy, what /health said) for the server at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read().decode(errors="replace")
            return response.status == 200, body
    except urllib.error.HTTPError as e:  # 503 while the model loads, or after it failed
        return False, f"{e.code} {e.read().decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {getattr(e, 'reason', e)}"


def main(proc: Path = Path("/proc")) -> int:
    url = os.environ.get("LORATUI_HEALTH_URL")
    if not url:
        found = serve_command(proc)
        if found is None:
            print("no `loratui serve` in this container: nothing to check")
            return 0
        url = f"http://127.0.0.1:{serve_port(*found)}/health"
    healthy, said = check(url)
    try:
        said = json.dumps(json.loads(said))
    except ValueError:
        pass
    print(f"{url}: {said}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
