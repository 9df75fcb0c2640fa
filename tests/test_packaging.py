"""The pinned dependency set: pyproject pins agree with the lock the Makefile installs from."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def _direct() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["cpu"] + extras["dev"] + extras["gemma3"]
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==([^;\s]+)", req)
        assert m, f"{req}: every direct dependency is pinned exactly"
        pins[_norm(m.group(1))] = m.group(3)
    return pins


def test_direct_pins_match_the_lock():
    lock, direct = _lock(), _direct()
    missing = sorted(set(direct) - set(lock))
    assert not missing, f"pinned in pyproject but not in requirements.lock: {missing}"
    differ = {n: (v, lock[n]) for n, v in direct.items() if lock[n] != v}
    assert not differ, f"pyproject vs lock: {differ}"


def test_installed_versions_match_the_lock():
    lock = _lock()
    wrong = {}
    for name, version in lock.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if have.split("+")[0] != version:
            wrong[name] = (version, have)
    assert not wrong, f"lock vs installed: {wrong}"


def test_torch_is_the_pinned_build():
    import torch

    assert torch.__version__.split("+")[0] == _lock()["torch"]
