"""What the TUI knows about a run, read from its directory: no Textual, no torch.

:class:`RunState` is a plain model the screens render from. It comes from two sources:

* the artifacts on disk (``data/report.json``, ``adapter/``, ``eval/metrics.json``, ``merged/``,
  ``exports/*/report.json``): which steps are done and which are blocked because an earlier
  artifact is missing;
* ``events.jsonl``: the last invocation of each step, so reopening a run whose job is still
  running elsewhere, was cancelled or died without a final event shows that state, and the
  training loss curve comes back.

Recent runs are kept in ``$LORATUI_STATE_DIR/recent.json`` (default ``~/.local/state/loratui``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import read_events
from loratui.pipeline.process import alive
from loratui.pipeline.registry import STEP_ORDER
from loratui.pipeline.runs import STEP_OUTPUTS, RunDir, atomic_write_text
from loratui.pipeline.train.history import AdapterVersion, curve_points, load_curve, version_dir

Status = Literal["todo", "done", "running", "failed", "cancelled", "interrupted", "blocked"]

# What each step leaves in the run directory when it is done.
DONE_ON_DISK: dict[str, Any] = {
    **{step: STEP_OUTPUTS[step] for step in STEP_ORDER[:-1]},
    "serve": lambda run: False,
}
_ADAPTER = ("a trained adapter (run Train)", DONE_ON_DISK["train"])
# What a step needs before it can run, and how to tell: (label, test on the run directory).
NEEDS: dict[str, tuple[str, Any] | None] = {
    "data": None,
    "train": None,  # train prepares the data itself when it is missing
    "eval": _ADAPTER,
    "merge": _ADAPTER,
    "export": _ADAPTER,  # export merges first when merged/ is missing or stale
    "serve": (
        "a trained adapter, a merged model or an export",
        lambda run: any(DONE_ON_DISK[s](run) for s in ("train", "merge", "export")),
    ),
}


@dataclass
class LastRun:
    """The last invocation of one step in ``events.jsonl``."""

    status: Status
    started: float
    ended: float | None = None
    message: str | None = None
    hint: str | None = None
    pid: int | None = None
    resume_from: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    cfg: RunConfig
    run: RunDir
    steps: dict[str, Status]
    why_blocked: dict[str, str]
    last: dict[str, LastRun]
    train_loss: list[tuple[int, float]]
    eval_loss: list[tuple[int, float]]
    events: list[Any]  # all of events.jsonl, as read
    rewards: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # REWARD_KEYS -> points

    @classmethod
    def load(cls, cfg: RunConfig) -> RunState:
        run = RunDir.for_config(cfg)
        events = read_events(run.events) if run.events.is_file() else []
        last = last_runs(events)
        steps: dict[str, Status] = {}
        why: dict[str, str] = {}
        for step in STEP_ORDER:
            need = NEEDS[step]
            seen = last.get(step)
            if seen is not None and seen.status in ("running", "failed", "cancelled", "interrupted"):
                steps[step] = seen.status
            elif DONE_ON_DISK[step](run):
                steps[step] = "done"
            elif need is not None and not need[1](run):
                steps[step] = "blocked"
                why[step] = f"needs {need[0]}"
            else:
                steps[step] = "todo"
        found = curves(events, run)
        rewards = {key: found[key] for key in REWARD_KEYS}
        return cls(cfg, run, steps, why, last, found["loss"], found["eval_loss"], events, rewards)

    def version_record(self, version: Any) -> AdapterVersion | None:
        """The provenance of adapter version ``version`` (its objective, beta, last figures), None without one."""
        return adapter_record(version_dir(self.run, version)) if isinstance(version, int) else None

    def report(self, name: str) -> Any:
        """A JSON artifact of the run (``data/report.json`` ...), or None when it is not there or torn."""
        path = self.run.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def last_runs(events: list[Any]) -> dict[str, LastRun]:
    """Each step's last invocation: started by its ``run ... in`` line, ended by done/error/cancelled.

    One without a final event is ``running`` when the process that wrote it is alive, else
    ``interrupted`` (killed, or the machine went down).
    """
    runs: dict[str, LastRun] = {}
    for e in events:
        if e.type == "log" and e.level == "debug" and e.message.startswith(f"{e.step}: run "):
            runs[e.step] = LastRun("running", e.t, pid=getattr(e, "pid", None))
            continue
        cur = runs.get(e.step)
        if cur is None or cur.status != "running":
            continue
        if e.type == "done":
            cur.status, cur.ended, cur.summary = "done", e.t, dict(e.summary)
        elif e.type == "error":
            cur.status, cur.ended, cur.message, cur.hint = "failed", e.t, e.message, e.hint
        elif e.type == "cancelled":
            cur.status, cur.ended, cur.resume_from = "cancelled", e.t, e.resume_from
    for cur in runs.values():
        if cur.status == "running" and not (cur.pid and alive(cur.pid, "loratui")):
            cur.status = "interrupted"
            cur.message = "the job ended without a final event (killed, or it is running in an older loratui)"
    return runs


Points = list[tuple[int, float]]
# the reward figures of a preference objective (train/callbacks.py PREFERENCE_FIGURES) that the Train view draws
REWARD_KEYS = ("reward_accuracy", "eval_reward_accuracy", "reward_margin", "eval_reward_margin")
CURVE_KEYS = ("loss", "eval_loss", *REWARD_KEYS)


def loss_curves(events: list[Any], run: RunDir | None = None) -> tuple[Points, Points]:
    """(step, loss) points, train and eval, of the training the run shows, in step order (see :func:`curves`)."""
    found = curves(events, run)
    return found["loss"], found["eval_loss"]


def curves(events: list[Any], run: RunDir | None = None) -> dict[str, Points]:
    """(step, value) points of each of :data:`CURVE_KEYS` (train and eval loss, the reward figures of a
    preference objective) of the training the run shows, in step order; every key is there (maybe empty).

    While a training invocation is going, or when it stopped without an adapter (cancelled, failed,
    killed): its own points, after a resume preceded by the curve up to the checkpoint it resumed from
    (its ``resuming from`` event carries the loss, from the checkpoint's ``trainer_state.json``; the
    reward figures up to that step come from the invocation before). Once a training finished, and with
    ``run``: the loss curve saved with the current adapter version (``adapters/vN/loss_history.json``,
    the same curve the report and the eval step's plot show), so a rollback shows its own version's
    curve and never one mixed with another version's; the reward figures (not in that file) are the
    last finished invocation's while its version is the current one, else none.
    """
    reader = _CurveReader()
    for e in events:
        if e.step == "train":
            reader.read(e)
    found = reader.points
    if run is not None and (
        reader.finished or not reader.started or (reader.ended and not found["loss"] and not found["eval_loss"])
    ):
        saved = load_curve(run.adapter)
        if saved is not None:
            found = {key: {} for key in CURVE_KEYS}
            found["loss"], found["eval_loss"] = saved
            if _is_current(run, reader.finished_version):
                found.update(reader.finished_rewards)
    return {key: sorted(found[key].items()) for key in CURVE_KEYS}


class _CurveReader:
    """The points of the training invocations in ``events.jsonl``, read in order (see :func:`curves`)."""

    def __init__(self) -> None:
        self.points: dict[str, dict[int, float]] = {key: {} for key in CURVE_KEYS}
        self.before: dict[str, dict[int, float]] = {}  # the reward points of the invocation before this one
        self.finished_rewards: dict[str, dict[int, float]] = {}  # those of the last invocation that finished
        self.finished_version: Any = None  # and the adapter version it made
        self.started = self.ended = self.finished = False

    def read(self, e: Any) -> None:
        if e.type == "log" and e.level == "debug" and e.message.startswith("train: run "):
            self.before = {key: self.points[key] for key in REWARD_KEYS}
            self.points = {key: {} for key in CURVE_KEYS}
            self.started, self.ended, self.finished = True, False, False
        elif e.type == "log" and getattr(e, "curve", None) is not None:  # resumed: the steps before it
            self.points["loss"], self.points["eval_loss"] = curve_points(e.curve)
            upto = max([*self.points["loss"], *self.points["eval_loss"]], default=0)
            for key in REWARD_KEYS:
                self.points[key] = {s: v for s, v in self.before.get(key, {}).items() if s <= upto}
        elif e.type == "metric" and e.at is not None:
            for key in CURVE_KEYS:
                value = e.values.get(key)
                if isinstance(value, (int, float)):
                    self.points[key][e.at] = float(value)
        elif e.type in ("done", "error", "cancelled"):
            self.ended, self.finished = True, e.type == "done"
            if self.finished:
                self.finished_rewards = {key: dict(self.points[key]) for key in REWARD_KEYS}
                self.finished_version = getattr(e, "summary", {}).get("version")


def _is_current(run: Any, version: Any) -> bool:
    """Whether the run's current adapter is ``version`` (True when either cannot tell: an older loratui)."""
    record = adapter_record(run.adapter)
    return version is None or record is None or record.version is None or record.version == version


def adapter_record(folder: Path) -> AdapterVersion | None:
    """The provenance (``loratui.json``) of an adapter folder; None when it has none or it is unreadable."""
    try:
        return AdapterVersion.load(folder)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ recent runs


def state_dir() -> Path:
    base = os.environ.get("LORATUI_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "loratui"
    )
    return Path(base)


def recent_runs(limit: int = 10) -> list[str]:
    """Config files opened lately, newest first (those that still exist)."""
    try:
        items = json.loads((state_dir() / "recent.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [p for p in items if isinstance(p, str) and Path(p).is_file()][:limit]


def remember(config_path: str | Path) -> None:
    """Put a config file at the top of the recent list (best effort: a read-only home is fine)."""
    path = str(Path(config_path).resolve())
    items = [path, *(p for p in recent_runs(50) if p != path)][:20]
    with contextlib.suppress(OSError):
        atomic_write_text(state_dir() / "recent.json", json.dumps(items, indent=1))


def run_dir_overrides(config: Path) -> list[str]:
    """A run's own ``config.yaml`` names its runs folder relative to where it was started: point it at
    the folder it is actually in, so opening a run from anywhere finds its artifacts."""
    import yaml

    if config.name != "config.yaml" or not (config.parent / "events.jsonl").is_file():
        return []
    try:
        name = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("name")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return []
    return [f"runs_dir={config.parent.parent.resolve()}"] if name == config.parent.name else []


def open_run(target: str | Path, overrides: list[str] | None = None) -> tuple[Path, list[str], RunConfig]:
    """``loratui open <run dir | config.yaml>``: (config file, overrides, config). Raises
    FileNotFoundError for a missing target, ConfigError for a bad config."""
    from loratui.pipeline.config import load_config

    path = resolve_open_target(target)
    overrides = run_dir_overrides(path) + list(overrides or [])
    return path, overrides, load_config(path, overrides)


def resolve_open_target(target: str | Path) -> Path:
    """``loratui open <run dir | config.yaml>``: the config file to load."""
    path = Path(target)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return path / "config.yaml"
        raise FileNotFoundError(f"{path} has no config.yaml: is it a loratui run directory?")
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path}: no such run directory or config file")
