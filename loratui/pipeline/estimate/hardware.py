"""What the device has free (memory) and the runs filesystem (disk), measured now."""

from __future__ import annotations

import shutil
from pathlib import Path


def ram_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes free for training on ``device``, what that figure is)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free on {torch.cuda.get_device_name()}"
    if device == "mps":
        import torch

        limit = int(torch.mps.recommended_max_memory())
        return limit - int(torch.mps.driver_allocated_memory()), "MPS recommended working set"
    return ram_available(), "RAM available"


def disk_free(path: Path) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
