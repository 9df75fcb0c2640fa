"""The files the data step leaves in a data folder for others to read, as typed records.

``dataset.json`` (:class:`DatasetManifest`): what later steps need to load the token datasets.
``report.json`` (:class:`DataReport`): what was read, dropped, truncated, split and tokenized.

Both load from and save to a folder (the run's ``data/`` or a cache entry). Keys unknown to these
models pass through a load and save unchanged; a save writes only the keys that were read or set,
in the order the data step has always written them, to a temporary file renamed into place.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict

from loratui.pipeline.models import Task
from loratui.pipeline.runs import RunDir, atomic_write_text


class _Record(BaseModel):
    """A JSON object that keeps keys it does not know."""

    model_config = ConfigDict(extra="allow")


class _File(_Record):
    """A record stored as one JSON file in a folder."""

    FILE: ClassVar[str]
    ENSURE_ASCII: ClassVar[bool] = True

    @classmethod
    def load(cls, folder: Path) -> Self:
        """Read ``folder/FILE``; OSError when it is missing, ValueError when it is not this record."""
        return cls.model_validate_json((folder / cls.FILE).read_text(encoding="utf-8"))

    def save(self, folder: Path) -> None:
        """Write ``folder/FILE`` atomically, two-space indented with a final newline."""
        data = self.model_dump(mode="json", exclude_unset=True)
        atomic_write_text(folder / self.FILE, json.dumps(data, indent=2, ensure_ascii=self.ENSURE_ASCII) + "\n")


class DatasetManifest(_File):
    """``dataset.json``: the processed splits and how they were made."""

    FILE: ClassVar[str] = "dataset.json"

    task: Task = "causal"  # manifests written before seq2seq support have no task
    # preference rows: "paired" (chosen + rejected: rejected_input_ids, rejected_labels, rejected columns) or
    # "unpaired" (one reply marked good or bad: a preference_label column); "none" for plain examples
    preference: Literal["none", "paired", "unpaired"] = "none"
    splits: dict[str, str]  # split -> folder relative to the manifest's folder, for splits with rows
    counts: dict[str, int]
    template: str | None  # the chat template's name; None for seq2seq
    chat_template: str | None  # the chat template's source; None for seq2seq
    render_date: str | None = None  # ISO date "today" renders as; absent before render dates were recorded
    max_length: int
    model_dir: str
    cache_key: str
    data_version: int


class RowCounts(_Record):
    read: int
    kept: int
    dropped: int
    truncated: int


class LengthStats(_Record):
    """Token lengths of a split; only ``rows`` (0) is written for an empty one."""

    rows: int
    min: int = 0
    median: float = 0.0
    p95: float = 0.0
    max: int = 0
    total: int = 0


class TokenCounts(_Record):
    """Token lengths per split (source lengths for seq2seq, with ``target`` the target lengths)."""

    train: LengthStats
    validation: LengthStats
    test: LengthStats
    target: dict[str, LengthStats] | None = None
    over_max_length: int
    per_epoch: int
    trained_per_epoch: int

    def split(self, name: str) -> LengthStats:
        stats: LengthStats = getattr(self, name)
        return stats


class PerTurn(_Record):
    """Chat rows the template made into one example per assistant turn."""

    rows: int
    examples: int
    why: str


class AugmentExample(_Record):
    """A dropped variation: of which user turn, by which method, why; for ``held-out`` the question it matched."""

    original: str
    variation: str
    method: str
    reason: str
    matched: str | None = None  # held-out: the validation or test question it (nearly) equals
    overlap: float | None = None  # held-out: the share of that question's words and word pairs it holds


class AugmentSample(_Record):
    """A training row's user turn and the variations kept of it (for ``loratui data preview``)."""

    original: str
    variations: list[str]
    methods: list[str]  # the method of each variation


class AugmentReport(_Record):
    """What ``data.augment`` added to the training split and what it dropped."""

    methods: list[str]
    variations: int  # asked for per row and method
    max_overlap: float
    rows: int  # training rows with a user turn to vary
    skipped: int  # training rows without one (documents, plain text, preference rows)
    held_out_questions: int  # validation and test questions the variations were checked against
    added: dict[str, int]  # method -> variations added
    dropped: dict[str, int]  # reason (copy, held-out, ...) -> variations dropped
    examples: dict[str, list[AugmentExample]]  # reason -> the first few dropped for it
    held_out: list[AugmentExample]  # every variation dropped as (nearly) a held-out question
    samples: list[AugmentSample]  # the first rows with variations


class DataReport(_File):
    """``report.json``. A report written when no training data was left has only the keys up to ``truncated``."""

    FILE: ClassVar[str] = "report.json"
    ENSURE_ASCII: ClassVar[bool] = False

    files: list[dict[str, Any]]  # per file read: path, split, kind, rows, format, reason, valid, extra_columns
    rows: RowCounts
    splits: dict[str, int]
    problems: dict[str, int]  # problem kind -> rows
    policy: dict[str, str]  # problem kind -> what data.on_problem does with it
    dropped: list[dict[str, Any]]  # RowProblem.to_dict() of each row dropped
    truncated: list[dict[str, Any]]  # ... and of each row truncated
    task: Task = "causal"
    preference: Literal["none", "paired", "unpaired"] = "none"
    template: str | None = None
    max_length: int = 0
    max_length_source: str = ""
    tokens: TokenCounts | None = None
    cache_key: str = ""
    per_turn: PerTurn | None = None
    render_date: str | None = None
    augment: AugmentReport | None = None  # only when data.augment is on


def run_render_date(run: RunDir) -> dt.date:
    """The date chat templates render "today" as in this run: the one its data step recorded, else today."""
    from loratui.pipeline.data.templates import today

    try:
        recorded = DatasetManifest.load(run.data).render_date
        return dt.date.fromisoformat(recorded or "")
    except (OSError, ValueError):  # no data yet, or a manifest from before the date
        return today()
