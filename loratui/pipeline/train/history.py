"""Adapter versions of a run: every trained adapter is kept, one of them is current.

```
runs/<name>/adapter/                 the current version (PEFT format), what later steps use
runs/<name>/adapters/v1/ v2/ ...      every version, each with loratui.json (provenance)
runs/<name>/adapters/history.json     {"current": 2, "versions": [{version, mode, parent, stack, ...}]}
runs/<name>/adapters/vN/loss_history.json   the version's whole loss curve (train and eval), resumes included
```
A version trained with ``mode: stack`` sits on top of the base with earlier versions merged into it:
its ``stack`` lists those versions in merge order, and ``loratui.json`` in the adapter folder says
so, so the merge step (and a user with plain peft) knows to merge them first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import RunDir, atomic_dir, atomic_write_text

META = "loratui.json"
CURVE = "loss_history.json"


Number = int | float  # as written: an int stays an int in the JSON


class AdapterVersion(BaseModel):
    """One trained adapter version: an entry of ``history.json`` and its folder's ``loratui.json``.

    Every key is optional (records of older loratui versions lack some); keys this model does not name
    are kept as they are, and ``dump`` writes back only the keys the record has.
    """

    model_config = ConfigDict(extra="allow")

    version: int | None = None
    mode: str | None = None
    parent: int | None = None
    stack: list[int | str] = Field(default_factory=list)  # versions merged below it (paths for foreign ones)
    stack_paths: list[str] = Field(default_factory=list)  # absolute folders of ``stack``, in merge order
    base: str | None = None
    model_dir: str | None = None
    task: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)  # source, cache_key, config: the eval step re-scores it
    method: str | None = None
    objective: str | None = None  # train.objective (sft, dpo, orpo, kto); absent before preference tuning
    beta: Number | None = None  # train.beta of a preference objective
    r: int | None = None
    alpha: int | None = None
    lr: Number | None = None
    epochs: Number | None = None
    max_steps: int | None = None
    effective_batch: int | None = None
    steps: int | None = None
    metrics: dict[str, Number | None] = Field(default_factory=dict)
    estimate: dict[str, Any] | None = None  # what `loratui estimate` expected before the first step
    created: str | None = None

    @classmethod
    def load(cls, adapter: str | Path) -> AdapterVersion | None:
        """The provenance file of an adapter folder (None for adapters from elsewhere)."""
        meta = Path(adapter) / META
        return cls.model_validate_json(meta.read_text(encoding="utf-8")) if meta.is_file() else None

    def save(self, adapter: Path) -> None:
        atomic_write_text(adapter / META, json.dumps(self.dump(), indent=2) + "\n")

    def dump(self) -> dict[str, Any]:
        """The record as JSON data, with the keys it was made or read with."""
        return self.model_dump(mode="json", exclude_unset=True)

    def stack_folders(self) -> list[Path]:
        """Adapter folders merged into the base, in order, before this version's adapter applies."""
        return [Path(p) for p in self.stack_paths]


class AdapterHistory(BaseModel):
    """``adapters/history.json``: every version of a run, and which one is current."""

    model_config = ConfigDict(extra="allow")

    current: int | None = None
    versions: list[AdapterVersion] = Field(default_factory=list)

    @staticmethod
    def file(run: RunDir) -> Path:
        return run.path / "adapters" / "history.json"

    @classmethod
    def load(cls, run: RunDir) -> AdapterHistory:
        path = cls.file(run)
        return cls.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else cls()

    def save(self, run: RunDir) -> None:
        data = {"current": self.current, "versions": [v.dump() for v in self.versions], **(self.model_extra or {})}
        atomic_write_text(self.file(run), json.dumps(data, indent=2) + "\n")

    def find(self, version: int | None) -> AdapterVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    def current_version(self) -> AdapterVersion | None:
        return self.find(self.current)

    def next_version(self) -> int:
        return max((v.version or 0 for v in self.versions), default=0) + 1


def version_dir(run: RunDir, version: int) -> Path:
    return run.path / "adapters" / f"v{version}"


def current_version(run: RunDir) -> AdapterVersion | None:
    """The version the run's ``adapter/`` holds now (after a rollback too), None before any training."""
    return AdapterHistory.load(run).current_version()


def curve_of(log_history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """``{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]}`` from the Trainer's ``log_history``.

    The Trainer restores ``log_history`` from the checkpoint it resumes from (``trainer_state.json``), so at
    the end of a resumed run it holds the whole curve: the steps before the interruption (up to the
    checkpoint, not the ones a killed attempt logged after it) and the ones after. This is the one source
    of the curve for the report, the eval step's plot and the TUI.
    """
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        if isinstance(entry.get("loss"), (int, float)):
            train[step] = float(entry["loss"])
        if isinstance(entry.get("eval_loss"), (int, float)):
            evals[step] = float(entry["eval_loss"])
    return {"train": [[s, train[s]] for s in sorted(train)], "eval": [[s, evals[s]] for s in sorted(evals)]}


def checkpoint_curve(checkpoint: Path) -> dict[str, list[list[float]]] | None:
    """The curve up to a training checkpoint, from its ``trainer_state.json`` (None when unreadable)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return curve_of(state.get("log_history") or [])


def curve_points(curve: Any) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, step -> eval loss) of a curve as written by :func:`curve_of` ({} for anything else)."""

    def points(key: str) -> dict[int, float]:
        rows = curve.get(key) if isinstance(curve, dict) else None
        return {int(r[0]): float(r[1]) for r in rows or [] if isinstance(r, (list, tuple)) and len(r) == 2}

    try:
        return points("train"), points("eval")
    except (TypeError, ValueError):
        return {}, {}


def load_curve(adapter: str | Path) -> tuple[dict[int, float], dict[int, float]] | None:
    """The loss curve saved with an adapter folder (``adapter/`` or ``adapters/vN``), or None when it has none
    (trained elsewhere, or by an older loratui)."""
    try:
        curve = json.loads((Path(adapter) / CURVE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return curve_points(curve)


def check_adapter_base(meta: AdapterVersion | None, adapter: Path, base: str, model_dir: Path) -> None:
    """Refuse an adapter trained on another base model: with equal shapes nothing else would fail,
    and every figure or weight made from the pair would be wrong."""
    if meta is None or not meta.base or meta.base == base:
        return
    if Path(meta.model_dir or "").resolve() != Path(model_dir).resolve():
        raise LoratuiError(
            f"{adapter} was trained on {meta.base}, but model.base is {base}",
            hint=f"Use model.base={meta.base}: an adapter only fits the weights it was trained on.",
        )


def _only_the_first_process(what: str) -> None:
    """The adapter and its history are the run's: in a run of several processes (several nodes too) only
    global rank 0 writes them; another process doing so is a bug that would race rank 0 on the shared folder."""
    rank = os.environ.get("RANK", "0").strip() or "0"
    if rank != "0":
        raise RuntimeError(f"{what} by process {rank}: only global rank 0 writes a run's adapter history")


def record(run: RunDir, entry: AdapterVersion, trained: Path) -> AdapterVersion:
    """Keep the adapter in ``trained`` as the next version and make it current."""
    _only_the_first_process("an adapter version recorded")
    version = entry.version
    assert version is not None  # a version to record has its number
    history = AdapterHistory.load(run)
    entry = entry.model_copy(update={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    entry.save(trained)
    with atomic_dir(version_dir(run, version)) as tmp:
        shutil.copytree(trained, tmp, dirs_exist_ok=True)
    history.versions.append(entry)
    _make_current(run, history, version)
    return entry


def _make_current(run: RunDir, history: AdapterHistory, version: int) -> None:
    _only_the_first_process("the current adapter replaced")
    with atomic_dir(run.adapter) as tmp:
        shutil.copytree(version_dir(run, version), tmp, dirs_exist_ok=True)
    history.current = version
    history.save(run)


def rollback(run: RunDir, version: int) -> AdapterVersion:
    """Make an earlier version current again; later versions stay in the history."""
    history = AdapterHistory.load(run)
    entry = history.find(version)
    if entry is None:
        listed = ", ".join(f"v{v}" for v in sorted(v.version for v in history.versions if v.version is not None))
        raise LoratuiError(
            f"{run.path}: no adapter version {version} (versions: {listed or 'none'})",
            hint="`loratui train history` lists them.",
        )
    if not version_dir(run, version).is_dir():
        raise LoratuiError(f"{version_dir(run, version)} is missing: the version's files were deleted")
    _make_current(run, history, version)
    return entry
