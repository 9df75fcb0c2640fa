"""Uploaded files: ``files/<id>.json`` (the file object, as OpenAI's API returns it) beside ``files/<id>/<name>``
(the bytes). An upload is checked with the data step's reading and row checks before it is kept."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import atomic_write_text
from loratui.serving.errors import ApiError
from loratui.serving.finetune.steps import read_rows

if TYPE_CHECKING:
    from loratui.pipeline.data.read import BuildFindings

FILE_PURPOSES = ("fine-tune",)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip("._") or "upload"
    return cleaned[-128:]


# Row formats by the preference data they hold (the data step's format names; others are plain examples).
PAIRED_FORMATS = ("preference", "openai_preference")  # a chosen and a rejected reply per prompt
UNPAIRED_FORMATS = ("unpaired_preference",)  # one reply per row, labelled good or bad (KTO)
_PAIRED_SHAPES = (
    "OpenAI's preference rows (input.messages, preferred_output, non_preferred_output) or prompt/chosen/rejected rows"
)


def validate_training_file(path: Path, filename: str, template: dict[str, Any], objective: str | None = None) -> str:
    """The data step's reading and row checks on an uploaded file, with the data settings ``template`` holds;
    with ``objective`` (a job's ``train.objective``), also whether its rows are data that objective trains on.

    Returns a one-line summary for ``status_details``; raises :class:`ApiError` (400) with the
    validation summary when the file cannot be read or any row is unusable: counts per problem and the
    first rows, by row number and field, as ``data/report.json`` would list them.
    """
    from loratui.pipeline.config import RunConfig

    data = copy.deepcopy(template)
    data.setdefault("data", {})["on_problem"] = {}  # every problem is collected, none fails early
    try:
        examples, found = read_rows(RunConfig.model_validate(data), path)
    except LoratuiError as e:
        message = e.message.replace(str(path), filename)  # the client's name for it, never the server's path
        message = message if message.startswith(filename) else f"{filename}: {message}"
        raise ApiError(400, message + (f" {e.hint}" if e.hint else ""), param="file", code="invalid_file") from None
    info = found.files[0] if found.files else {}
    if found.problems or not examples:
        raise ApiError(400, _failed_validation(filename, found, info), param="file", code="invalid_file")
    if objective is not None:
        check_objective(filename, objective, info)
    return f"{examples} examples, {info.get('kind')}, format {info.get('format')} ({info.get('reason')})"


def check_objective(filename: str, objective: str, info: dict[str, Any]) -> None:
    """400 unless the file's rows (``info``: its format and why, as the data step found them) are data a job
    with ``objective`` trains on: dpo and orpo need chosen/rejected pairs; sft takes plain examples and pairs
    (it learns the chosen replies) but not unpaired good/bad replies (it would learn the bad ones too); kto takes
    either kind of preference rows."""
    fmt = str(info.get("format"))
    found = f"format {fmt} ({info.get('reason')})"
    if objective in ("dpo", "orpo") and fmt not in PAIRED_FORMATS:
        why = (
            "one reply per row, labelled good or bad, not a chosen and a rejected reply"
            if fmt in UNPAIRED_FORMATS
            else "rows with one reply each, not a chosen and a rejected reply"
        )
        article = "an" if objective == "orpo" else "a"
        message = f"{filename}: {article} {objective} job trains on preference pairs, and this file has {why}: {found}"
        raise ApiError(400, f"{message}. Upload {_PAIRED_SHAPES}.", param="file", code="invalid_file")
    if objective == "kto" and fmt not in PAIRED_FORMATS + UNPAIRED_FORMATS:
        message = f"{filename}: a kto job trains on replies labelled good or bad, and this file has none: {found}"
        raise ApiError(
            400,
            f"{message}. Upload prompt/completion/label rows or preference pairs.",
            param="file",
            code="invalid_file",
        )
    if objective == "sft" and fmt in UNPAIRED_FORMATS:
        message = f"{filename}: a supervised job would learn every reply of this file, those labelled bad too: {found}"
        hint = "Upload the good replies as chat rows, or preference pairs (a supervised job learns the chosen ones)."
        raise ApiError(400, f"{message}. {hint}", param="file", code="invalid_file")


def _failed_validation(filename: str, found: BuildFindings, info: dict[str, Any]) -> str:
    """Why no example of the file is usable: counts per problem, its format, and the first rows' problems."""
    counts = Counter(p.kind for p in found.problems)
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    first = sorted(found.problems, key=lambda p: p.row or 0)[:5]
    rows = "; ".join(f"row {p.row}" + (f", field '{p.field}'" if p.field else "") + f": {p.message}" for p in first)
    bad = len({p.row for p in found.problems})
    summary = (
        f"{filename} failed validation: {bad} of {found.rows_read} rows are unusable ({kinds})"
        if found.problems
        else f"{filename} failed validation: no examples in {found.rows_read} rows"
    )
    detected = f"; format {info.get('format')} ({info.get('reason')})" if info else ""
    return (
        summary + detected + (f". First: {rows}" if rows else "") + ". Fix the rows, "
        "or give the columns' meaning in the server's data.columns."
    )


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")


def _check_upload(filename: str, purpose: str) -> str:
    """The name an upload is stored under; 400 for a purpose or file type this server does not take."""
    if purpose not in FILE_PURPOSES:
        raise ApiError(
            400,
            f"purpose: {purpose!r} is not supported here (this server accepts "
            + ", ".join(repr(p) for p in FILE_PURPOSES)
            + ")",
            param="purpose",
        )
    from loratui.pipeline.data.loaders import DATA_EXTENSIONS

    name = safe_filename(filename)
    ext = Path(name).suffix.lower()
    if ext not in DATA_EXTENSIONS:
        raise ApiError(
            400,
            f"{filename}: unsupported file type {ext or '(no extension)'}; fine-tuning "
            f"files are {', '.join(sorted(DATA_EXTENSIONS))}",
            param="file",
            code="invalid_file",
        )
    return name


class FileStore:
    """The uploaded files of a jobs folder; every method is safe from any thread."""

    def __init__(self, root: Path):
        self.root = root / "files"
        self.lock = threading.Lock()

    def _record(self, file_id: str) -> Path:
        if not re.fullmatch(r"file-[0-9a-f]{24}", file_id):
            raise _not_found(file_id)
        return self.root / f"{file_id}.json"

    def add(self, upload: Path, filename: str, purpose: str, template: dict[str, Any]) -> dict[str, Any]:
        """Validate ``upload`` (a temporary file, moved or removed) and record it; the file object."""
        name = _check_upload(filename, purpose)
        file_id = "file-" + secrets.token_hex(12)
        folder = self.root / file_id
        folder.mkdir(parents=True, exist_ok=True)
        stored = folder / name
        try:
            os.replace(upload, stored)
            details = validate_training_file(stored, filename, template)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self._keep(file_id, stored, filename, purpose, details)

    def add_result(self, filename: str, text: str) -> dict[str, Any]:
        """A file the server writes (a job's step metrics), with purpose ``fine-tune-results``."""
        file_id = "file-" + secrets.token_hex(12)
        stored = self.root / file_id / filename
        atomic_write_text(stored, text)
        return self._keep(file_id, stored, filename, "fine-tune-results", None)

    def _keep(self, file_id: str, stored: Path, filename: str, purpose: str, details: str | None) -> dict[str, Any]:
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": stored.stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": details,
            "expires_at": None,
        }
        text = json.dumps({**obj, "path": str(stored)}, indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(self.root / f"{file_id}.json", text)
        return obj

    def record(self, file_id: str) -> dict[str, Any]:
        """The file object plus ``path``, where the bytes are; 404 for an unknown id."""
        record = self._record(file_id)
        if not record.is_file():
            raise _not_found(file_id)
        return _read(record)

    def for_job(self, param: str, file_id: str) -> dict[str, Any]:
        """:meth:`record` of the upload a job request names as ``param``; 400 unless it is one for fine-tuning."""
        try:
            record = self.record(file_id)
        except ApiError:
            raise ApiError(400, f"{param}: no uploaded file {file_id!r}", param=param, code="file_not_found") from None
        if record["purpose"] != "fine-tune":
            raise ApiError(400, f"{param}: {file_id} was not uploaded with purpose 'fine-tune'", param=param)
        return record

    def exists(self, file_id: str) -> bool:
        return (self.root / f"{file_id}.json").is_file()

    def get(self, file_id: str) -> dict[str, Any]:
        obj = self.record(file_id)
        obj.pop("path", None)
        return obj

    def list(self, purpose: str | None = None, order: str = "desc") -> list[dict[str, Any]]:
        found = []
        for record in self.root.glob("file-*.json") if self.root.is_dir() else []:
            try:
                obj = _read(record)
            except (OSError, ValueError):
                continue
            obj.pop("path", None)
            if purpose is None or obj.get("purpose") == purpose:
                found.append(obj)
        return sorted(found, key=lambda o: (o["created_at"], o["id"]), reverse=order != "asc")

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        with self.lock:
            self._record(file_id).unlink(missing_ok=True)
            shutil.rmtree(self.root / file_id, ignore_errors=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
