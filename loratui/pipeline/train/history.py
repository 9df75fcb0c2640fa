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
import shutil
import time
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import RunDir, atomic_dir, atomic_write_text

META = "loratui.json"
CURVE = "loss_history.json"


def _history_file(run: RunDir) -> Path:
    return run.path / "adapters" / "history.json"


def load_history(run: RunDir) -> dict[str, Any]:
    path = _history_file(run)
    if not path.is_file():
        return {"current": None, "versions": []}
    return json.loads(path.read_text(encoding="utf-8"))


def version_dir(run: RunDir, version: int) -> Path:
    return run.path / "adapters" / f"v{version}"


def current_version(run: RunDir) -> dict[str, Any] | None:
    history = load_history(run)
    for v in history["versions"]:
        if v["version"] == history["current"]:
            return v
    return None


def next_version(run: RunDir) -> int:
    return max((v["version"] for v in load_history(run)["versions"]), default=0) + 1


def adapter_meta(path: str | Path) -> dict[str, Any]:
    """loratui's provenance file of an adapter folder ({} for adapters from elsewhere)."""
    meta = Path(path) / META
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


def curve_of(log_history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """``{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]}`` from the Trainer's ``log_history``.

    The Trainer restores ``log_history`` from the checkpoint it resumes from (``trainer_state.json``), so at
    the end of a resumed run it holds the whole curve: the steps before the interruption (up to the
    checkpoint, not the ones a killed attempt logged after it) and the ones after. This is the one source
    of the curve for the report, the evaluate step's plot and the TUI.
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


def check_adapter_base(meta: dict[str, Any], adapter: Path, base: str, model_dir: Path) -> None:
    """Refuse an adapter trained on another base model: with equal shapes nothing else would fail,
    and every figure or weight made from the pair would be wrong."""
    trained_on = meta.get("base")
    if (
        trained_on
        and trained_on != base
        and Path(str(meta.get("model_dir", ""))).resolve() != Path(model_dir).resolve()
    ):
        raise LoratuiError(
            f"{adapter} was trained on {trained_on}, but model.base is {base}",
            hint=f"Use model.base={trained_on}: an adapter only fits the weights it was trained on.",
        )


def stack_paths(run: RunDir, entry: dict[str, Any]) -> list[Path]:
    """Adapter folders to merge into the base, in order, before ``entry``'s adapter applies."""
    return [version_dir(run, v) for v in entry.get("stack", [])]


def record(run: RunDir, entry: dict[str, Any], trained: Path) -> dict[str, Any]:
    """Keep the adapter in ``trained`` as the next version and make it current."""
    history = load_history(run)
    entry = {**entry, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    target = version_dir(run, entry["version"])
    atomic_write_text(trained / META, json.dumps(entry, indent=2) + "\n")
    with atomic_dir(target) as tmp:
        shutil.copytree(trained, tmp, dirs_exist_ok=True)
    history["versions"].append(entry)
    history["current"] = entry["version"]
    _make_current(run, history, entry["version"])
    return entry


def _make_current(run: RunDir, history: dict[str, Any], version: int) -> None:
    with atomic_dir(run.adapter) as tmp:
        shutil.copytree(version_dir(run, version), tmp, dirs_exist_ok=True)
    history["current"] = version
    atomic_write_text(_history_file(run), json.dumps(history, indent=2) + "\n")


def rollback(run: RunDir, version: int) -> dict[str, Any]:
    """Make an earlier version current again; later versions stay in the history."""
    history = load_history(run)
    known = {v["version"]: v for v in history["versions"]}
    if version not in known:
        listed = ", ".join(f"v{v}" for v in sorted(known)) or "none"
        raise LoratuiError(
            f"{run.path}: no adapter version {version} (versions: {listed})", hint="`loratui train history` lists them."
        )
    if not version_dir(run, version).is_dir():
        raise LoratuiError(f"{version_dir(run, version)} is missing: the version's files were deleted")
    _make_current(run, history, version)
    return known[version]
