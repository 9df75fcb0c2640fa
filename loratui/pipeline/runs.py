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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loratui.pipeline.config import RunConfig


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. Only ``create`` touches the disk."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @classmethod
    def for_config(cls, cfg: RunConfig) -> "RunDir":
        return cls(cfg.run_dir)

    def create(self, cfg: RunConfig) -> "RunDir":
        """Make the folder and write the resolved ``config.yaml`` (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_config(self.config, cfg)
        return self


def write_config(path: Path, cfg: RunConfig) -> None:
    header = "# Resolved loratui config: `loratui <step> --config this-file` reproduces the run.\n"
    atomic_write_text(path, header + cfg.to_yaml())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """The modes a plain open()/mkdir() would have given (temp files are created private, 0600/0700)."""
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_modes(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
