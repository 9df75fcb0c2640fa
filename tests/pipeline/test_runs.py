"""Run directories and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.runs import RunDir, atomic_dir, atomic_write_bytes, atomic_write_text, write_config


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_run_dir_paths(tmp_path):
    cfg = RunConfig(name="r1", runs_dir=str(tmp_path))
    run = RunDir.for_config(cfg)
    assert run.path == tmp_path / "r1"
    assert run.config == run.path / "config.yaml"
    assert run.events == run.path / "events.jsonl"
    assert run.adapter == run.path / "adapter"
    assert run.checkpoints == run.path / "checkpoints"
    assert run.merged == run.path / "merged"
    assert run.exports == run.path / "exports"
    assert run.report == run.path / "report.md"
    assert not run.path.exists()  # only create() touches the disk


def test_create_writes_a_reloadable_config(tmp_path):
    cfg = RunConfig(name="r2", runs_dir=str(tmp_path / "deep" / "runs"))
    run = RunDir.for_config(cfg).create(cfg)
    assert run.path.is_dir()
    assert _listing(run.path) == ["config.yaml"]
    assert load_config(run.config) == cfg
    # create again with a changed config: replaced, still one file
    cfg2 = cfg.model_copy(deep=True)
    cfg2.train.lr = 0.5
    run.create(cfg2)
    assert load_config(run.config).train.lr == 0.5
    assert _listing(run.path) == ["config.yaml"]


def test_write_config_header(tmp_path):
    path = tmp_path / "c.yaml"
    write_config(path, RunConfig())
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "reproduces the run" in first


def test_atomic_write_text_replaces_content_whole(tmp_path):
    target = tmp_path / "out" / "report.md"
    atomic_write_text(target, "long content " * 1000)
    assert target.read_text() == "long content " * 1000
    atomic_write_text(target, "short é")
    assert target.read_text(encoding="utf-8") == "short é"
    assert _listing(target.parent) == ["report.md"]  # no temp files left


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "blob.bin"
    atomic_write_bytes(target, b"\x00\x01\x02")
    atomic_write_bytes(target, b"\xff")
    assert target.read_bytes() == b"\xff"
    assert _listing(tmp_path) == ["blob.bin"]


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["keep.txt"]


def _make_dir(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_atomic_dir_failure_leaves_old_directory_untouched(tmp_path):
    target = tmp_path / "adapter"
    _make_dir(target, {"weights.bin": "old weights", "config.json": "{}"})

    with pytest.raises(ValueError, match="half way"):
        with atomic_dir(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            (tmp / "weights.bin").write_text("new, partial")
            (tmp / "extra.txt").write_text("x")
            raise ValueError("half way")

    assert _listing(tmp_path) == ["adapter"]  # no temp dir behind
    assert _listing(target) == ["config.json", "weights.bin"]
    assert (target / "weights.bin").read_text() == "old weights"


def test_atomic_dir_failure_without_existing_directory(tmp_path):
    target = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("a")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _listing(tmp_path) == []


def test_atomic_dir_success_replaces_directory_whole(tmp_path):
    target = tmp_path / "adapter"
    _make_dir(target, {"weights.bin": "old weights", "stale.txt": "stale"})

    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("new weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("f")
        # nothing visible under the final name until the body finishes
        assert (target / "weights.bin").read_text() == "old weights"

    assert _listing(tmp_path) == ["adapter"]  # neither temp nor old dir left
    assert _listing(target) == ["sub", "weights.bin"]
    assert (target / "weights.bin").read_text() == "new weights"
    assert (target / "sub" / "f").read_text() == "f"


def test_atomic_dir_creates_new_directory(tmp_path):
    target = tmp_path / "nested" / "exports"
    with atomic_dir(target) as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF")
    assert (target / "model.gguf").read_bytes() == b"GGUF"
    assert _listing(target.parent) == ["exports"]


def test_published_folders_leave_hard_linked_cache_files_alone(tmp_path):
    import os

    from loratui.pipeline.runs import UMASK, atomic_dir

    cache = tmp_path / "cache.bin"
    cache.write_bytes(b"x")
    os.chmod(cache, 0o600)
    with atomic_dir(tmp_path / "out") as tmp:
        os.link(cache, tmp / "linked.bin")
        (tmp / "own.txt").write_text("y")
        os.chmod(tmp / "own.txt", 0o600)
    assert cache.stat().st_mode & 0o777 == 0o600  # shared inode: untouched
    assert (tmp_path / "out" / "own.txt").stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~UMASK


def test_config_with_an_api_key_is_private_and_modes_are_kept(tmp_path):
    import os

    from loratui.pipeline.config import load_config
    from loratui.pipeline.runs import UMASK, atomic_write_text, write_config

    secret = tmp_path / "secret.yaml"
    write_config(secret, load_config(None, ["serve.api_key=k"]))
    assert secret.stat().st_mode & 0o777 == 0o600
    plain = tmp_path / "plain.yaml"
    write_config(plain, load_config(None, []))
    assert plain.stat().st_mode & 0o777 == 0o666 & ~UMASK
    os.chmod(plain, 0o640)
    atomic_write_text(plain, "again")
    assert plain.stat().st_mode & 0o777 == 0o640
