"""scripts/family_assets.py (offline: a small sdist stands in for PyPI's) and tests/family_assets.py."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests import family_assets


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("llama_cpp_python-9.9.9/vendor/llama.cpp/models/templates/link.jinja")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_extracts_only_templates_and_vocabs_once_and_whole(tmp_path, monkeypatch):
    script = family_assets._script()
    models = "llama_cpp_python-9.9.9/vendor/llama.cpp/models/"
    sdist = _sdist(
        tmp_path / "llama_cpp_python-9.9.9.tar.gz",
        {
            models + "templates/Qwen-Qwen3-0.6B.jinja": b"{{ messages }}",
            models + "templates/README.md": b"not a template",
            models + "ggml-vocab-qwen2.gguf": b"GGUF",
            models + "ggml-vocab-qwen2.gguf.inp": b"not a vocab",
            models + "other.gguf": b"GGUF",
            "llama_cpp_python-9.9.9/llama_cpp/llama.py": b"code",
        },
    )
    downloads = []

    def download(version: str, into: Path) -> Path:
        downloads.append(version)
        return sdist

    monkeypatch.setattr(script, "_download_sdist", download)
    root = tmp_path / "assets"
    target = script.ensure_assets("9.9.9", root)
    assert target == root / "llama-cpp-python-9.9.9"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "templates/Qwen-Qwen3-0.6B.jinja",
        "vocab/ggml-vocab-qwen2.gguf",
    ]
    assert [p.name for p in root.iterdir()] == [target.name], "no temporary folder is left behind"
    assert script.ensure_assets("9.9.9", root) == target and downloads == ["9.9.9"], "a second call is a no-op"

    monkeypatch.setenv("LORATUI_ASSETS", str(root))
    monkeypatch.setattr(script, "locked_version", lambda: "9.9.9")
    assert family_assets.template("Qwen-Qwen3-0.6B") == "{{ messages }}"
    assert family_assets.vocab("qwen2") == target / "vocab" / "ggml-vocab-qwen2.gguf"


def test_a_failed_extraction_leaves_nothing(tmp_path, monkeypatch):
    script = family_assets._script()
    sdist = _sdist(tmp_path / "empty.tar.gz", {"llama_cpp_python-9.9.9/setup.py": b""})
    monkeypatch.setattr(script, "_download_sdist", lambda version, into: sdist)
    with pytest.raises(SystemExit, match="found nothing for templates, vocab"):
        script.ensure_assets("9.9.9", tmp_path / "assets")
    assert not any((tmp_path / "assets").iterdir())


def test_missing_assets_say_to_run_make_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUI_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match="make assets"):
        family_assets.template("Qwen-Qwen3-0.6B")


def test_the_locked_version_is_read_from_requirements_lock():
    script = family_assets._script()
    assert script.locked_version() == next(
        line.split("==")[1].strip()
        for line in (Path(script.REPO) / "requirements.lock").read_text().splitlines()
        if line.startswith("llama-cpp-python==")
    )
