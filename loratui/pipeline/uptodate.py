"""Which steps of a run are up to date: a fingerprint of each step's inputs, recorded when it finishes.

A step's fingerprint hashes the config sections it reads, the size and modification time of the local
files they name (datasets, a local base model), and the fingerprint of the step it builds on::

    data   <- model, data          train <- data + lora, train
    eval   <- train + eval         merge <- train + merge         export <- merge + export

So editing ``lora.r`` makes train and every step after it stale, while editing ``export.gguf_quants``
leaves all but export up to date; a step that uses the adapter is also stale once training ran after
it. ``runs/<name>/steps.json`` keeps, per step, the fingerprint of its
last successful run (written by :func:`loratui.pipeline.steps.run_step`, so every face records it) and
the fingerprint a train step started with (so ``loratui run`` knows whether its checkpoints belong to
the same settings and can be resumed).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.runs import STEP_OUTPUTS, RunDir, atomic_write_text

SECTIONS_OF: dict[str, tuple[str, ...]] = {
    "data": ("model", "data"),
    "train": ("lora", "train"),
    "eval": ("eval",),
    "merge": ("merge",),
    "export": ("export",),
}
UPSTREAM: dict[str, str | None] = {"data": None, "train": "data", "eval": "train", "merge": "train", "export": "merge"}
# How a step is invoked, not what it computes.
# resume, and where this node sits in a multi-node run: every node computes the same fingerprint
IGNORED: dict[str, tuple[str, ...]] = {"train": ("resume", "node_rank", "main_address", "main_port")}
# What each export format leaves when it finished (exporters.registry names the same formats).
EXPORT_OUTPUTS: dict[str, str] = {
    "safetensors": "merged/config.json",
    "gguf": "exports/gguf/report.json",
    "gguf-lora": "exports/gguf/lora-report.json",
    "onnx": "exports/onnx/report.json",
}
STATE_FILE = "steps.json"
_MAX_FILES = 10_000  # a folder of documents is signed by its first files (sorted), enough to see edits


def _path_signature(value: str) -> Any:
    """(size, mtime) of a local file, of every file under a local folder or matching a glob; None for
    anything else (a hub id, a bundled dataset name, a number)."""
    if any(c in value for c in "*?["):
        import glob

        matches = sorted(glob.glob(os.path.expanduser(value), recursive=True))[:_MAX_FILES]
        return [[m, *(_path_signature(m) or [])] for m in matches] or None
    try:
        path = Path(value).expanduser()
        if path.is_file():
            st = path.stat()
            return [st.st_size, st.st_mtime_ns]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())[:_MAX_FILES]
            return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    except (OSError, ValueError):
        pass
    return None


def _local_files(values: Any) -> dict[str, Any]:
    """Signatures of every string in ``values`` (nested) that names a local file or folder."""
    found: dict[str, Any] = {}

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if v and ("/" in v or "." in v) and (sig := _path_signature(v)) is not None:
                found[v] = sig
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    walk(values)
    return found


def fingerprint(cfg: RunConfig, step: str) -> str:
    """The fingerprint of ``step``'s inputs under ``cfg`` (see the module docstring)."""
    dumped = cfg.model_dump(mode="json")
    sections = {
        name: {k: v for k, v in dumped[name].items() if k not in IGNORED.get(step, ())} for name in SECTIONS_OF[step]
    }
    upstream = UPSTREAM[step]
    payload = {
        "step": step,
        "sections": sections,
        "files": _local_files(sections),
        "upstream": fingerprint(cfg, upstream) if upstream else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def recorded(run: RunDir) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((run.path / STATE_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(run: RunDir, step: str, **fields: Any) -> None:
    """Merge ``fields`` into ``steps.json``'s entry for ``step`` (atomically)."""
    state = recorded(run)
    state[step] = {**state.get(step, {}), **fields}
    atomic_write_text(run.path / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def record_done(run: RunDir, step: str, fp: str) -> None:
    record(run, step, fingerprint=fp, finished=round(time.time(), 3))


def _builds_on_train(step: str) -> bool:
    up = UPSTREAM[step]
    return up == "train" or (up is not None and _builds_on_train(up))


def _outputs_present(cfg: RunConfig, run: RunDir, step: str) -> bool:
    if step == "export":  # every format asked for, not just any
        return all((run.path / EXPORT_OUTPUTS[f]).is_file() for f in cfg.export.formats)
    return STEP_OUTPUTS[step](run)


def up_to_date(cfg: RunConfig, run: RunDir, step: str) -> bool:
    """True when ``step`` last finished with these inputs, its outputs are still on disk and, for the steps
    that use the adapter, it finished after the last training (a retrain with the same settings gives
    another adapter; re-preparing the same data gives the same data, so data does not count)."""
    state = recorded(run)
    mine = state.get(step, {})
    if mine.get("fingerprint") != fingerprint(cfg, step) or not _outputs_present(cfg, run, step):
        return False
    trained = state.get("train", {}).get("finished")
    return not (_builds_on_train(step) and trained is not None and mine.get("finished", 0) < trained)
