"""Resolving model.base offline: local directories, GGUF files, hub ids, built-in names."""

from __future__ import annotations

import time

import pytest

from loratui.pipeline import models
from loratui.pipeline.errors import ModelNotFound


def test_local_hf_directory(tiny_llama):
    r = models.resolve_model(str(tiny_llama))
    assert r.source == "local" and r.path == tiny_llama.resolve()


def test_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="no such built-in model, file or directory"):
        models.resolve_model(str(tmp_path / "nope.gguf"))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(ModelNotFound, match="not .gguf"):
        models.resolve_model(str(f))


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(Exception, match="not a readable GGUF"):
        models.resolve_model(str(f))
    assert not list((tmp_path / "home" / "models").glob("broken*")), "no half-written import left behind"


def test_typo_in_builtin_name_suggests_the_right_one():
    with pytest.raises(ModelNotFound) as exc:
        models.resolve_model("smollm2-135m-instruc")
    assert "smollm2-135m-instruct" in (exc.value.hint or "")


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(ModelNotFound, match="not found locally.*HF_HUB_OFFLINE"):
        models.resolve_model("some-org/some-model")
    assert time.monotonic() - t < 10


def test_hub_id_unreachable_fails_fast_without_hanging(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t = time.monotonic()
    with pytest.raises(ModelNotFound, match=r"not found locally, and the hub \(http://127.0.0.1:9\) is unreachable"):
        models.resolve_model("some-org/some-model")
    assert time.monotonic() - t < 10


def test_hub_id_from_the_local_hf_cache(monkeypatch, tmp_path, tiny_llama):
    """A hub id already in the HF cache resolves offline, as transformers would load it."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at import otherwise
    repo = hub / "models--acme--tiny"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_llama, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    r = models.resolve_model("acme/tiny")
    assert r.source == "hub" and r.path == snap
    assert (r.path / "config.json").is_file()


def test_builtin_listing_has_name_source_path():
    rows = models.list_models()
    names = [r["name"] for r in rows]
    assert models.DEFAULT_MODEL in names
    for row in rows:
        assert {"name", "source", "path", "prepared"} <= set(row)
        assert (row["path"] is None) == (not row["prepared"])


def test_builtin_gguf_ships_in_the_package():
    path = models.builtin_gguf(models.DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_gguf_file_resolves_into_the_cache(tmp_path, monkeypatch):
    """A user's .gguf maps to a cache folder named after it and keyed by its content."""
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    src = models.builtin_gguf(models.DEFAULT_MODEL)
    mine = tmp_path / "My Model.Q4_1.gguf"
    mine.symlink_to(src)
    r = models.resolve_model(str(mine), prepare=False)
    assert r.source == "gguf" and r.origin == str(mine.resolve())
    assert r.path.parent == tmp_path / "home" / "models"
    assert r.path.name.startswith("smollm2-135m-instruct.q4_1-")  # the symlink resolves to the real file
    assert r.path == models.imported_dir(src)
