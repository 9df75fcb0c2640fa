"""The job record (``jobs/<job-id>/job.json``) and the jobs folder that holds one per job.

A record is written to a temporary name and renamed, so a crash never leaves half of one. Fields a record
never had stay out of its file (a job gets ``trained_tokens`` and ``result_files`` when it succeeds), and a
record written by an earlier version of loratui loads as it is.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from loratui.pipeline.runs import atomic_write_text
from loratui.serving.errors import ApiError
from loratui.serving.finetune.request import Hyperparameters

Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
# A new job's state: written out in full, as every version of the record has it.
NEW_JOB: dict[str, Any] = {
    "status": "validating_files",
    "error": None,
    "fine_tuned_model": None,
    "finished_at": None,
    "started_at": None,
    "pid": None,
    "exit_code": None,
    "stopping": False,
}


class JobError(BaseModel):
    """Why a job failed, as OpenAI's job object shows it."""

    code: str
    message: str
    param: str | None  # no default: the field is always written


class JobRecord(BaseModel):
    """One fine-tuning job: what was asked, where it runs, and how far it got."""

    id: str
    seq: int  # creation order: the queue's order
    created_at: int
    model: str  # as the request named it
    base: str  # the config's model.base
    base_name: str  # the base's name in ft:<base>:<suffix>:<id>
    suffix: str
    training_file: str
    validation_file: str | None
    hyperparameters: Hyperparameters  # as asked ("auto" where not)
    method: Literal["supervised", "dpo"] = "supervised"  # OpenAI's method type (records before DPO: supervised)
    beta: Literal["auto"] | float | None = None  # dpo: method.dpo.hyperparameters.beta as asked
    train_beta: float | None = None  # dpo: the train.beta of the job's config, what it trains with
    seed: int | None
    metadata: dict[str, str] | None
    settings: dict[str, Any]  # the loratui config settings the request set
    status: Status
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    started_at: int | None
    run_dir: Path
    pid: int | None
    exit_code: int | None
    stopping: bool = False  # cancelled, its process not yet ended
    trained_tokens: int | None = None
    result_files: list[str] = []

    @classmethod
    def load(cls, path: Path) -> JobRecord:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def save(self, path: Path) -> None:
        data = self.model_dump(mode="json", exclude_unset=True)
        atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def changed(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` (validated); they are written with it."""
        return JobRecord.model_validate({**self.model_dump(exclude_unset=True), **changes})

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("ftjob-")

    def model_name(self) -> str:
        """The model id this job makes (or made): ``ft:<base>:<suffix>:<id>``."""
        return self.fine_tuned_model or f"ft:{self.base_name}:{self.suffix}:{self.short_id}"


def _no_job(job_id: str) -> ApiError:
    return ApiError(404, f"No fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")


class JobStore:
    """The jobs folder: ``<job-id>/job.json`` (the record), ``config.yaml`` (the run it runs), ``events.jsonl``
    (the job's own events) and ``output.log`` (what its process printed). The manager's lock orders writes."""

    def __init__(self, root: Path):
        self.root = root / "jobs"

    def folder(self, job_id: str) -> Path:
        """The job's folder; 404 for a name that is no job id (so no path leaves the jobs folder)."""
        if not re.fullmatch(r"ftjob-[0-9a-f]{12}", job_id):
            raise _no_job(job_id)
        return self.root / job_id

    def load(self, job_id: str) -> JobRecord:
        path = self.folder(job_id) / "job.json"
        if not path.is_file():
            raise _no_job(job_id)
        return JobRecord.load(path)

    def save(self, job: JobRecord) -> None:
        job.save(self.folder(job.id) / "job.json")

    def all(self) -> list[JobRecord]:
        """Every readable record, newest first."""
        found = []
        for path in self.root.glob("ftjob-*/job.json") if self.root.is_dir() else []:
            try:
                found.append(JobRecord.load(path))
            except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
                continue
        return sorted(found, key=lambda j: (j.created_at, j.seq), reverse=True)

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        line = {"t": time.time(), "level": level, "message": message, "data": data, "type": "message"}
        with open(self.folder(job_id) / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")

    def events(self, job_id: str) -> list[tuple[int, dict[str, Any]]]:
        """The job's own events, oldest first, by line number (a line that cannot be read is skipped)."""
        path = self.folder(job_id) / "events.jsonl"
        found: list[tuple[int, dict[str, Any]]] = []
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
            try:
                found.append((n, json.loads(raw)))
            except ValueError:
                continue
        return found
