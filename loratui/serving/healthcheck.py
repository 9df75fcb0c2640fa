"""The containers' health check: ``python -m loratui.serving.healthcheck`` (Dockerfiles' ``HEALTHCHECK``).

When the container runs ``loratui serve`` (or ``loratui run ... --serve``), the check asks that server's
``/health`` at the address serve itself resolves: ``--host``/``--port``, else ``serve.host``/``serve.port``
of ``--config`` or of the served run's ``config.yaml``, else 127.0.0.1:8000 (``0.0.0.0`` is asked on
loopback). It passes only when the model is loaded (200). A container running any other step (train, export ...) has no server to
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

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # ServeConfig's defaults; tests check they agree


# `loratui serve` options that take a value (the others are flags); the first other word is the target.
_VALUED = ("--config", "-c", "--format", "--host", "--port", "--api-key", "--model-name", "--adapter")


def serve_command(proc: Path = Path("/proc")) -> tuple[list[str], Path] | None:
    """(the arguments of ``loratui serve``, its working directory) of a running server, or None.

    ``loratui run CONFIG --serve`` counts too: its arguments come back as ``serve --config CONFIG``."""
    for entry in sorted(proc.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone since the listing, or not ours to read
            continue
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) != "loratui":
                continue
            rest = [a for a in argv[i + 2 :] if a]
            if argv[i + 1] == "serve":
                return rest, entry / "cwd"
            if argv[i + 1] == "run" and "--serve" in rest:
                words = [a for a in rest if not a.startswith("-") and "=" not in a]
                return (["--config", words[0]] if words else []), entry / "cwd"
    return None


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _target(args: list[str]) -> str | None:
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def serve_address(args: list[str], cwd: Path = Path(".")) -> tuple[str, int]:
    """(host, port) that ``loratui serve ARGS`` listens on, found as serve finds them: --host/--port, else
    ``serve.host``/``serve.port`` of --config or of the target run's config.yaml, else the defaults."""
    host, port = _option(args, "--host"), _option(args, "--port")
    config = _option(args, "--config", "-c")
    if config is None and (target := _target(args)) is not None and (cwd / target / "config.yaml").is_file():
        config = str(Path(target) / "config.yaml")
    if config and (host is None or port is None):
        import yaml

        try:
            serve = (yaml.safe_load((cwd / config).read_text()) or {}).get("serve") or {}
            host, port = host or serve.get("host"), port or serve.get("port")
        except (OSError, yaml.YAMLError, AttributeError):
            pass
    host = host or DEFAULT_HOST
    if host in ("0.0.0.0", "::", ""):  # every address: ask loopback
        host = "127.0.0.1" if host != "::" else "::1"
    return host, int(port) if port is not None else DEFAULT_PORT


def ask(url: str, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, body) of a GET of ``url``; (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:  # 503 while the model loads, or after it failed
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, f"{url}: {getattr(e, 'reason', e)}"


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """(healthy, what /health said) for the server at ``url``."""
    status, body = ask(url, timeout)
    if status is None or status < 300:
        return status == 200, body
    return False, f"{status} {body}"


def main(proc: Path = Path("/proc")) -> int:
    url = os.environ.get("LORATUI_HEALTH_URL")
    if not url:
        found = serve_command(proc)
        if found is None:
            print("no `loratui serve` in this container: nothing to check")
            return 0
        host, port = serve_address(*found)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
    healthy, said = check(url)
    try:
        said = json.dumps(json.loads(said))
    except ValueError:
        pass
    print(f"{url}: {said}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
