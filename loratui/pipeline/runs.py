"""Run directories and atomic file writes.

```
runs/<name>/config.yaml  events.jsonl  data/  adapter/  checkpoints/  eval/  merged/  exports/  report.md
```
Every artifact is written to a temporary sibling and renamed into place, so a crash or a cancel
never leaves a half-written file or folder under its final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from loratui.pipeline.config import RunConfig


class _InRun:
    """A named path of the run directory's layout: ``run.events`` is ``run.path / "events.jsonl"``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, run: None, owner: type[RunDir]) -> _InRun: ...

    @overload
    def __get__(self, run: RunDir, owner: type[RunDir]) -> Path: ...

    def __get__(self, run: RunDir | None, owner: type[RunDir]) -> Path | _InRun:
        return self if run is None else run.path / self.name


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. Only ``create`` touches the disk."""

    path: Path

    config = _InRun("config.yaml")
    events = _InRun("events.jsonl")
    data = _InRun("data")
    adapter = _InRun("adapter")
    checkpoints = _InRun("checkpoints")
    eval = _InRun("eval")
    merged = _InRun("merged")
    exports = _InRun("exports")
    report = _InRun("report.md")

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(cfg.run_dir)

    def create(self, cfg: RunConfig) -> RunDir:
        """Make the folder and write the resolved ``config.yaml`` (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_config(self.config, cfg)
        return self


# What each step (by its CLI name) leaves in the run directory when it finished. The TUI's step bar
# and `loratui run` read this one table.
STEP_OUTPUTS: dict[str, Callable[[RunDir], bool]] = {
    "data": lambda run: (run.data / "report.json").is_file(),
    "train": lambda run: (run.adapter / "adapter_config.json").is_file(),
    "eval": lambda run: (run.eval / "metrics.json").is_file(),
    "merge": lambda run: (run.merged / "config.json").is_file(),
    "export": lambda run: any(run.exports.glob("*/report.json")),
}


def write_config(path: Path, cfg: RunConfig) -> None:
    """The run's resolved config; private (0600) when it holds the server's API key."""
    header = "# Resolved loratui config: `loratui <step> --config this-file` reproduces the run.\n"
    atomic_write_bytes(path, (header + cfg.to_yaml()).encode("utf-8"), private=bool(cfg.serve.api_key))


def _read_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: changing the umask to read it races with other threads creating files


def publish_modes(path: Path) -> None:
    """Give private entries (0600/0700, as temp files and folders are created) the modes a plain
    open()/mkdir() would have. Left alone: symlinks, hard links (shared with a cache) and anything
    already readable by others."""
    for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
        with contextlib.suppress(OSError):
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode) or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
                continue
            if st.st_mode & 0o077 == 0:
                full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o666
                os.chmod(entry, full & ~UMASK)


def atomic_write_bytes(path: str | Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``. The file keeps the mode of
    the file it replaces; a new one gets the umask's default (0600 when ``private``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not private:
            try:
                mode = path.stat().st_mode & 0o777
            except FileNotFoundError:
                mode = 0o666 & ~UMASK
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    On an exception the temporary folder is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_modes(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
