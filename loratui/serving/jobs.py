"""Fine-tuning over HTTP, headless: uploaded files and fine-tuning jobs, kept on disk, run as subprocesses.

This is what ``/v1/files`` and ``/v1/fine_tuning/jobs`` (:mod:`loratui.serving.jobs_api`) stand on. A job
is a run like any other: its config is the server's job template plus what the request asked for, and
``loratui run`` runs it (data, train, eval, merge, and export when the template names formats) in
``<runs_dir>/ft-<id>/``. Jobs run one per slot (one per GPU, else one); the others wait in a queue.

The jobs folder (``serve.jobs_dir``, default ``<runs_dir>/.fine_tuning``)::

    files/<file-id>.json        the file object, as OpenAI's API returns it
    files/<file-id>/<name>      the uploaded bytes
    jobs/<job-id>/job.json      the job record (status, error, the process, ...)
    jobs/<job-id>/config.yaml   the config the job runs
    jobs/<job-id>/events.jsonl  the job's own events (validated, queued, started, finished ...)
    jobs/<job-id>/output.log    what the job's process printed

Everything is written to a temporary name and renamed, so a crash never leaves half a record. A server
that starts finds the jobs it was running marked failed (their process is stopped if it is still
alive, which saves a checkpoint) and ``resume`` continues them from their latest checkpoint.
"""

from __future__ import annotations

import builtins
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import atomic_write_text
from loratui.serving.errors import ApiError

TERMINAL = ("succeeded", "failed", "cancelled")
FILE_PURPOSES = ("fine-tune",)
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# Config a client may set per job (under `loratui` or `metadata["loratui.<key>"]`): the sections that shape the
# training. Never where the server reads or writes (paths), what code it trusts, or how it serves.
CLIENT_SECTIONS = ("data", "lora", "train", "eval", "merge", "export")
CLIENT_DENIED = {
    "data.source",
    "data.val_source",
    "data.test_source",
    "lora.init_from",
    "train.resume",
    "eval.model",
    "eval.retention_sources",
    "merge.adapter",
    "train.report_to",
}
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_LIVE_OUTPUT_EVENTS = ("metric", "log", "artifact", "checkpoint", "done", "error", "cancelled")
# The job's process: Linux stops it (SIGTERM: it saves a checkpoint) when the thread that started it dies,
# which is the server dying, whatever killed it.
_CHILD_SHIM = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def _now() -> int:
    return int(time.time())


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def page(items: list[dict[str, Any]], after: str | None, limit: int, most: int = 100) -> dict[str, Any]:
    """OpenAI's cursor page over ``items`` (already in the order the API lists them)."""
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit: {limit} is out of range (1 to {most})", param="limit")
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"after: no item with id {after!r} in this list", param="after")
        start = ids.index(after) + 1
    chunk = items[start : start + limit]
    out: dict[str, Any] = {"object": "list", "data": chunk, "has_more": start + limit < len(items)}
    if chunk:
        out.update(first_id=chunk[0]["id"], last_id=chunk[-1]["id"])
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip("._") or "upload"
    return cleaned[-128:]


def validate_training_file(path: Path, filename: str, template: dict[str, Any]) -> str:
    """The data step's reading and row checks on an uploaded file, with the data settings ``template`` holds.

    Returns a one-line summary for ``status_details``; raises :class:`ApiError` (400) with the
    validation summary when the file cannot be read or any row is unusable: counts per problem and the
    first rows, by row number and field, as ``data/report.json`` would list them.
    """
    from loratui.pipeline.config import RunConfig
    from loratui.pipeline.data.step import BuildFindings, read_examples

    data = copy.deepcopy(template)
    data.setdefault("data", {})["on_problem"] = {}  # every problem is collected, none fails early
    cfg = RunConfig.model_validate(data)
    out = BuildFindings()
    try:
        examples = read_examples(cfg, [path], out, "train")
    except LoratuiError as e:
        message = e.message.replace(str(path), filename)  # the client's name for it, never the server's path
        message = message if message.startswith(filename) else f"{filename}: {message}"
        raise ApiError(400, message + (f" {e.hint}" if e.hint else ""), param="file", code="invalid_file") from None
    info = out.files[0] if out.files else {}
    if out.problems or not examples:
        counts = Counter(p.kind for p in out.problems)
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
        first = sorted(out.problems, key=lambda p: p.row or 0)[:5]
        rows = "; ".join(f"row {p.row}" + (f", field '{p.field}'" if p.field else "") + f": {p.message}" for p in first)
        bad = len({p.row for p in out.problems})
        summary = (
            f"{filename} failed validation: {bad} of {out.rows_read} rows are unusable ({kinds})"
            if out.problems
            else f"{filename} failed validation: no examples in {out.rows_read} rows"
        )
        detected = f"; format {info.get('format')} ({info.get('reason')})" if info else ""
        raise ApiError(
            400,
            summary + detected + (f". First: {rows}" if rows else "") + ". Fix the rows, "
            "or give the columns' meaning in the server's data.columns.",
            param="file",
            code="invalid_file",
        )
    return f"{len(examples)} examples, {info.get('kind')}, format {info.get('format')} ({info.get('reason')})"


class FileStore:
    """Uploaded files: ``files/<id>.json`` (the file object) beside ``files/<id>/<name>`` (the bytes)."""

    def __init__(self, root: Path):
        self.root = root / "files"
        self.lock = threading.Lock()

    def _record(self, file_id: str) -> Path:
        if not re.fullmatch(r"file-[0-9a-f]{24}", file_id):
            raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return self.root / f"{file_id}.json"

    def add(self, upload: Path, filename: str, purpose: str, template: dict[str, Any]) -> dict[str, Any]:
        """Validate ``upload`` (a temporary file, moved or removed) and record it; the file object."""
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
            "created_at": _now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": details,
            "expires_at": None,
        }
        _write_json(self.root / f"{file_id}.json", {**obj, "path": str(stored)})
        return obj

    def record(self, file_id: str) -> dict[str, Any]:
        """The file object plus ``path``, where the bytes are; 404 for an unknown id."""
        record = self._record(file_id)
        if not record.is_file():
            raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return _read_json(record)

    def get(self, file_id: str) -> dict[str, Any]:
        obj = self.record(file_id)
        obj.pop("path", None)
        return obj

    def list(self, purpose: str | None = None, order: str = "desc") -> list[dict[str, Any]]:
        found = []
        for record in self.root.glob("file-*.json") if self.root.is_dir() else []:
            try:
                obj = _read_json(record)
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


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@dataclass
class JobSettings:
    root: Path  # the jobs folder
    runs_dir: Path  # where each job's run directory goes
    template: dict[str, Any]  # the run config every job starts from (RunConfig.model_dump(mode="json"))
    slots: int = 1  # jobs running at once
    gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES for slot i: gpus[i] (empty: leave it)
    served_bases: dict[str, str] = field(default_factory=dict)  # served model id -> model.base for jobs naming it
    grace_s: float = 120.0  # SIGTERM, then SIGKILL after this long
    command: list[str] = field(default_factory=lambda: ["-m", "loratui"])  # after the Python executable


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def client_settings(extension: Any, metadata: dict[str, str] | None) -> dict[str, Any]:
    """loratui settings of a job request: the ``loratui`` field (nested or dotted) and ``metadata`` keys
    ``loratui.<section>.<field>`` (values parsed as YAML). Only training settings; paths and trust are refused."""
    found: dict[str, Any] = {}
    if extension is not None:
        if not isinstance(extension, dict):
            raise ApiError(
                400,
                'loratui: expected an object of config settings, e.g. {"lora": {"r": 16}, "train": {"lr": 1e-4}}',
                param="loratui",
            )
        _flatten("", extension, found)
    for key, value in (metadata or {}).items():
        if key.startswith("loratui."):
            try:
                found[key.removeprefix("loratui.")] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                found[key.removeprefix("loratui.")] = value
    for key in found:
        parts = key.split(".")
        if not all(_KEY_PART.fullmatch(part) for part in parts):
            raise ApiError(
                400,
                f"loratui.{key}: not a config setting (dotted names of letters, digits and _)",
                param=f"loratui.{key}",
            )
        if parts[0] not in CLIENT_SECTIONS or key in CLIENT_DENIED or len(parts) < 2:
            allowed = ", ".join(f"{s}.*" for s in CLIENT_SECTIONS)
            raise ApiError(
                400,
                f"loratui.{key}: not a setting a job request may change (allowed: {allowed}; "
                f"except {', '.join(sorted(CLIENT_DENIED))})",
                param=f"loratui.{key}",
            )
    return found


def _auto_or(value: Any, name: str, kind: type, positive: bool = True) -> Any:
    if value is None or value == "auto":
        return "auto"
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    )
    if not ok or (positive and value <= 0):
        what = "a positive integer" if kind is int else "a positive number"
        raise ApiError(
            400, f"hyperparameters.{name}: expected 'auto' or {what}, got {value!r}", param=f"hyperparameters.{name}"
        )
    return kind(value)


class JobManager:
    """Files, jobs and the workers that run them; every public method is safe from any thread."""

    def __init__(self, settings: JobSettings, log: Callable[[str], None] = print):
        self.settings = settings
        self.log = log
        self.files = FileStore(settings.root)
        self.jobs_root = settings.root / "jobs"
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: list[threading.Thread] = []
        self.stopping = False

    # ---------------------------------------------------------------- records

    def _dir(self, job_id: str) -> Path:
        if not re.fullmatch(r"ftjob-[0-9a-f]{12}", job_id):
            raise ApiError(404, f"No fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")
        return self.jobs_root / job_id

    def _load(self, job_id: str) -> dict[str, Any]:
        path = self._dir(job_id) / "job.json"
        if not path.is_file():
            raise ApiError(404, f"No fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="job_not_found")
        return _read_json(path)

    def _save(self, job: dict[str, Any]) -> None:
        _write_json(self._dir(job["id"]) / "job.json", job)

    def _records(self) -> list[dict[str, Any]]:
        found = []
        for path in self.jobs_root.glob("ftjob-*/job.json") if self.jobs_root.is_dir() else []:
            try:
                found.append(_read_json(path))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda j: (j["created_at"], j["seq"]), reverse=True)

    def _event(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        line = {"t": time.time(), "level": level, "message": message, "data": data, "type": "message"}
        with open(self._dir(job_id) / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        with self.lock:
            job = self._load(job_id)
            job.update(changes)
            self._save(job)
            return job

    # ---------------------------------------------------------------- creating

    def _base_of(self, model: str) -> tuple[str, str]:
        """(model.base for the job's config, the base's name in ``ft:<base>:...``) of a request's ``model``."""
        if model in self.settings.served_bases:
            return self.settings.served_bases[model], model
        if model.startswith("ft:"):  # a fine-tuned model: train on top of its merged weights
            for job in self._records():
                if job.get("fine_tuned_model") == model and job["status"] == "succeeded":
                    merged = Path(job["run_dir"]) / "merged"
                    if not (merged / "config.json").is_file():
                        raise ApiError(400, f"model: {model} has no merged weights to train on", param="model")
                    return str(merged), model.split(":")[1]
            raise ApiError(404, f"model: no succeeded job made {model!r}", param="model", code="model_not_found")
        from loratui.pipeline.models import BUILTINS

        own = self.settings.template.get("model", {}).get("base")
        if model in BUILTINS or (_HUB_ID.match(model) and not Path(model).exists()):
            return model, model
        if model == own:  # the job template's own base (which may be a path on the server)
            return model, Path(model).name if Path(model).exists() else model
        offered = [*self.settings.served_bases, *(b for b in BUILTINS)]
        raise ApiError(
            400,
            f"model: {model!r} is not a model this server fine-tunes: name a model it serves or "
            f"a built-in one ({', '.join(offered)}), a Hugging Face hub id (org/name), or an ft: "
            "model of a succeeded job",
            param="model",
            code="model_not_found",
        )

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a ``POST /v1/fine_tuning/jobs`` body, record the job and start validating its files."""
        from pydantic import ValidationError

        from loratui.pipeline.config import RunConfig, dump_yaml

        model = body.get("model")
        training_file = body.get("training_file")
        if not isinstance(model, str):
            raise ApiError(
                400, "model: required (a base model, a model this server serves, or an ft: model)", param="model"
            )
        if not isinstance(training_file, str):
            raise ApiError(
                400, "training_file: required (the id of a file uploaded with purpose fine-tune)", param="training_file"
            )
        validation_file = body.get("validation_file")
        files = {"training_file": training_file, **({"validation_file": validation_file} if validation_file else {})}
        paths = {}
        for param, file_id in files.items():
            try:
                record = self.files.record(str(file_id))
            except ApiError:
                raise ApiError(
                    400, f"{param}: no uploaded file {file_id!r}", param=param, code="file_not_found"
                ) from None
            paths[param] = Path(record["path"])
            if record["purpose"] != "fine-tune":
                raise ApiError(400, f"{param}: {file_id} was not uploaded with purpose 'fine-tune'", param=param)
        hyper = body.get("hyperparameters") or {}
        if not isinstance(hyper, dict):
            raise ApiError(400, "hyperparameters: expected an object", param="hyperparameters")
        hyper = dict(hyper)
        method = body.get("method")
        if method:
            kind = method.get("type") if isinstance(method, dict) else None
            if kind != "supervised":
                raise ApiError(
                    400,
                    f"method.type: {kind!r} is not supported (loratui fine-tunes with 'supervised')",
                    param="method.type",
                )
            supervised = method.get("supervised") or {}
            more = supervised.get("hyperparameters") or {} if isinstance(supervised, dict) else None
            if not isinstance(more, dict):
                raise ApiError(
                    400,
                    "method.supervised.hyperparameters: expected an object",
                    param="method.supervised.hyperparameters",
                )
            hyper.update(more)
        unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
        if unknown:
            raise ApiError(
                400,
                f"hyperparameters.{unknown[0]}: unknown (known: {', '.join(HYPERPARAMETERS)})",
                param=f"hyperparameters.{unknown[0]}",
            )
        n_epochs = _auto_or(hyper.get("n_epochs"), "n_epochs", int)
        batch_size = _auto_or(hyper.get("batch_size"), "batch_size", int)
        lr_mult = _auto_or(hyper.get("learning_rate_multiplier"), "learning_rate_multiplier", float)
        suffix = body.get("suffix") or ""
        if not isinstance(suffix, str) or not _SUFFIX.match(suffix):
            raise ApiError(400, "suffix: up to 64 letters, digits, '.', '_' or '-'", param="suffix")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ApiError(400, f"seed: expected a non-negative integer, got {seed!r}", param="seed")
        metadata = body.get("metadata") or {}
        if (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise ApiError(
                400, "metadata: up to 16 string keys (64 characters) and string values (512)", param="metadata"
            )
        if body.get("integrations"):
            raise ApiError(
                400,
                "integrations: not supported; set loratui.train.report_to on the server's job template instead",
                param="integrations",
            )
        settings = client_settings(body.get("loratui"), metadata)
        base, base_name = self._base_of(model)

        short = secrets.token_hex(6)
        job_id = f"ftjob-{short}"
        data = copy.deepcopy(self.settings.template)
        data.update(name=f"ft-{short}", runs_dir=str(self.settings.runs_dir))
        data["serve"] = {**data.get("serve", {}), "api_key": None}
        data.setdefault("model", {})["base"] = base
        data.setdefault("data", {}).update(
            source=[str(paths["training_file"])], val_source=str(paths["validation_file"]) if validation_file else None
        )
        train = data.setdefault("train", {})
        if n_epochs != "auto":
            train["epochs"] = n_epochs
        if batch_size != "auto":
            train["effective_batch"] = batch_size
            train["grad_accum"] = "auto"
        if lr_mult != "auto":
            train["lr"] = float(train.get("lr", 2e-4)) * lr_mult
        if seed is not None:
            train["seed"] = data["data"]["seed"] = seed
        for key, value in settings.items():
            node = data
            *path, last = key.split(".")
            for part in path:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ApiError(400, f"loratui.{key}: {part} is a setting, not a section", param=f"loratui.{key}")
                node = child
            node[last] = value
        if (
            base != self.settings.template.get("model", {}).get("base")
            and base not in self.settings.served_bases.values()
        ):
            data["model"]["trust_remote_code"] = False  # only the operator's own models may run their code
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as e:  # name the setting and what is allowed
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ApiError(
                400, f"loratui.{where}: {first.get('msg')} (got {first.get('input')!r})", param=f"loratui.{where}"
            ) from None
        folder = self._dir(job_id)
        folder.mkdir(parents=True)
        atomic_write_text(
            folder / "config.yaml",
            "# The run this fine-tuning job runs (`loratui run` this file).\n" + dump_yaml(cfg.model_dump(mode="json")),
        )
        with self.lock:
            seq = max((j.get("seq", 0) for j in self._records()), default=0) + 1
            job = {
                "id": job_id,
                "seq": seq,
                "created_at": _now(),
                "model": model,
                "base": base,
                "base_name": base_name,
                "suffix": suffix,
                "training_file": training_file,
                "validation_file": validation_file,
                "hyperparameters": {
                    "n_epochs": n_epochs,
                    "batch_size": batch_size,
                    "learning_rate_multiplier": lr_mult,
                },
                "seed": seed if seed is not None else cfg.train.seed,
                "metadata": metadata or None,
                "settings": settings,
                "status": "validating_files",
                "error": None,
                "fine_tuned_model": None,
                "finished_at": None,
                "started_at": None,
                "run_dir": str(cfg.run_dir),
                "pid": None,
                "exit_code": None,
                "stopping": False,
            }
            self._save(job)
        self._event(
            job_id,
            f"Validating training file: {training_file}"
            + (f" and validation file: {validation_file}" if validation_file else ""),
        )
        self._start_validation(job_id)
        return self.public(job)

    def _start_validation(self, job_id: str) -> None:
        threading.Thread(target=self._validate, args=(job_id,), name=f"validate-{job_id}", daemon=True).start()

    def _validate(self, job_id: str) -> None:
        """The files again, now with the job's own data settings; then the queue."""
        param = "training_file"
        try:
            template = yaml.safe_load((self._dir(job_id) / "config.yaml").read_text(encoding="utf-8"))
            job = self._load(job_id)
            for param in ("training_file", "validation_file"):
                if job[param]:
                    try:
                        record = self.files.record(job[param])
                    except ApiError:
                        raise ApiError(400, f"{job[param]} was deleted", param=param) from None
                    validate_training_file(Path(record["path"]), record["filename"], template)
        except Exception as e:  # noqa: BLE001 - the job fails, the server stays up
            with self.lock:
                if self._load(job_id)["status"] == "validating_files":  # not cancelled meanwhile
                    error = (
                        {"code": f"invalid_{param}", "message": e.message, "param": param}
                        if isinstance(e, ApiError)
                        else {"code": "validation_error", "message": f"{type(e).__name__}: {e}", "param": None}
                    )
                    self._finish(job_id, "failed", error)
            return
        with self.lock:
            job = self._load(job_id)
            if job["status"] != "validating_files":  # cancelled meanwhile
                return
            self._update(job_id, status="queued")
            self._event(job_id, "Files validated, moving job to queued state")
            self.wake.notify_all()

    # ---------------------------------------------------------------- running

    def start(self) -> None:
        """Recover what a previous server left, then start the workers."""
        self.recover()
        for slot in range(max(1, self.settings.slots)):
            t = threading.Thread(target=self._work, args=(slot,), name=f"fine-tuning-{slot}", daemon=True)
            t.start()
            self.workers.append(t)

    def recover(self) -> None:
        for job in self._records():
            if job["status"] in ("running", "validating_files") or job.get("stopping"):
                pid = job.get("pid")
                if pid and _is_our_process(pid, self._dir(job["id"]) / "config.yaml"):
                    self.log(f"fine-tuning: stopping {job['id']}'s process {pid}, left from the last server")
                    _stop_pid(pid, self.settings.grace_s)
                if job["status"] == "validating_files":  # it never ran: check its files again
                    self._event(job["id"], "The server restarted: validating the files again")
                    self._start_validation(job["id"])
                elif job["status"] == "running":
                    ckpt = self._latest_checkpoint(job)
                    message = "the server stopped while this job ran" + (
                        f"; its latest checkpoint ({ckpt.name}) is kept: POST /v1/fine_tuning/jobs/{job['id']}/resume "
                        "continues from it"
                        if ckpt
                        else "; resume starts it again"
                    )
                    self._finish(job["id"], "failed", {"code": "server_restarted", "message": message, "param": None})
                else:
                    self._update(job["id"], stopping=False, pid=None)

    def _next(self) -> dict[str, Any] | None:
        queued = [j for j in self._records() if j["status"] == "queued" and j["id"] not in self.procs]
        return min(queued, key=lambda j: j["seq"]) if queued else None

    def _work(self, slot: int) -> None:
        while not self.stopping:
            job = None
            try:
                with self.lock:
                    job = self._next()
                    while job is None and not self.stopping:
                        self.wake.wait(timeout=5)
                        job = self._next()
                    if job is None:
                        return
                    proc = self._launch(job, slot)
                if proc is not None:
                    self._exited(job["id"], proc.wait())
            except Exception as e:  # noqa: BLE001 - one job's trouble (a full disk ...) must not stop the worker
                self.log(f"fine-tuning: worker {slot}: {type(e).__name__}: {e}")
                if job is not None:
                    try:
                        self.procs.pop(job["id"], None)
                        self._finish(
                            job["id"],
                            "failed",
                            {"code": "server_error", "param": None, "message": f"{type(e).__name__}: {e}"},
                        )
                    except Exception:  # noqa: BLE001
                        pass
                time.sleep(1)

    def _launch(self, job: dict[str, Any], slot: int) -> subprocess.Popen[bytes] | None:
        folder = self._dir(job["id"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORATUI_JOB_ID": job["id"]}
        env.pop("LORATUI_API_KEY", None)
        if self.settings.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.gpus[slot % len(self.settings.gpus)]
        command = [sys.executable, "-c", _CHILD_SHIM, *self.settings.command, "run", str(folder / "config.yaml")]
        try:
            with open(folder / "output.log", "ab") as out:
                proc = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
        except OSError as e:
            self._finish(
                job["id"], "failed", {"code": "launch_failed", "message": f"cannot start the job: {e}", "param": None}
            )
            return None
        self.procs[job["id"]] = proc
        resumed = job.get("started_at") is not None
        self._update(
            job["id"],
            status="running",
            pid=proc.pid,
            started_at=job.get("started_at") or _now(),
            error=None,
            stopping=False,
        )
        self._event(
            job["id"],
            ("Fine-tuning job resumed" if resumed else "Fine-tuning job started")
            + f" (process {proc.pid}, run {job['run_dir']})",
        )
        return proc

    def _exited(self, job_id: str, code: int) -> None:
        with self.lock:
            self.procs.pop(job_id, None)
            job = self._load(job_id)
            if job["status"] == "cancelled":
                ckpt = self._latest_checkpoint(job)
                self._update(job_id, pid=None, stopping=False, exit_code=code)
                self._event(
                    job_id,
                    "The job's process stopped" + (f"; {ckpt.name} is kept (resume continues from it)" if ckpt else ""),
                    data={"exit_code": code},
                )
            elif code == 0:
                self._finish(job_id, "succeeded", None, exit_code=code)
            elif self.stopping:
                ckpt = self._latest_checkpoint(job)
                self._finish(
                    job_id,
                    "failed",
                    {
                        "code": "server_stopped",
                        "message": "the server stopped while this "
                        "job ran" + (f"; {ckpt.name} is kept: resume continues from it" if ckpt else ""),
                        "param": None,
                    },
                    exit_code=code,
                )
            else:
                self._finish(job_id, "failed", self._failure(job, code), exit_code=code)
            self.wake.notify_all()

    def _failure(self, job: dict[str, Any], code: int) -> dict[str, Any]:
        """The error of a job whose process failed: the run's last error event, else the log's end."""
        for event in reversed(self._run_events(job)):
            if event.type == "error":
                message = event.message + (f" ({event.hint})" if event.hint else "")
                param = "training_file" if event.step == "data" else None
                return {"code": f"{event.step}_failed", "message": message, "param": param}
        tail = ""
        log = self._dir(job["id"]) / "output.log"
        if log.is_file():
            tail = " ".join(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:])[-600:]
        reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return {
            "code": "process_failed",
            "message": f"the job's process {reason}" + (f": {tail}" if tail else ""),
            "param": None,
        }

    def _finish(self, job_id: str, status: str, error: dict[str, Any] | None, **more: Any) -> None:
        with self.lock:
            job = self._load(job_id)
            changes: dict[str, Any] = {
                "status": status,
                "error": error,
                "finished_at": _now(),
                "pid": None,
                "stopping": False,
                **more,
            }
            if status == "succeeded":
                changes["fine_tuned_model"] = (
                    f"ft:{job['base_name']}:{job['suffix']}:{job['id'].removeprefix('ftjob-')}"
                )
                changes["trained_tokens"] = self._trained_tokens(job)
                changes["result_files"] = [self.files.add_result("step_metrics.csv", self._step_metrics(job))["id"]]
            self._update(job_id, **changes)
        if status == "succeeded":
            self._event(job_id, f"New fine-tuned model created: {changes['fine_tuned_model']}")
            self._event(job_id, "The job has successfully completed")
        else:
            self._event(
                job_id,
                f"Job {status}" + (f": {error['message']}" if error else ""),
                level="error" if status == "failed" else "warn",
            )

    # ---------------------------------------------------------------- cancel, resume, stop

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self._load(job_id)
            if job["status"] in TERMINAL:
                raise ApiError(
                    400, f"the job is already {job['status']}", param="fine_tuning_job_id", code="job_not_cancellable"
                )
            proc = self.procs.get(job_id)
            self._update(job_id, status="cancelled", finished_at=_now(), stopping=proc is not None)
            self._event(
                job_id,
                "Job cancelled" + (" (stopping its process: the latest checkpoint is kept)" if proc else ""),
                level="warn",
            )
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            threading.Thread(target=_kill_after, args=(proc, self.settings.grace_s), daemon=True).start()
        return self.get(job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self._load(job_id)
            if job["status"] not in ("failed", "cancelled"):
                raise ApiError(
                    400,
                    f"only a failed or cancelled job resumes; this one is {job['status']}",
                    param="fine_tuning_job_id",
                    code="job_not_resumable",
                )
            if job_id in self.procs:
                raise ApiError(
                    409,
                    "the job's process is still stopping; retry in a moment",
                    param="fine_tuning_job_id",
                    code="job_stopping",
                )
            if job.get("error") and str(job["error"].get("code", "")).startswith("invalid_"):
                raise ApiError(
                    400,
                    "the job's files failed validation: create a new job with fixed files",
                    param="fine_tuning_job_id",
                    code="job_not_resumable",
                )
            for param in ("training_file", "validation_file"):
                if job[param] and not (self.files.root / f"{job[param]}.json").is_file():
                    raise ApiError(
                        400,
                        f"the job's {param} {job[param]} was deleted: create a new job",
                        param="fine_tuning_job_id",
                        code="job_not_resumable",
                    )
            if job.get("started_at") is None:  # cancelled before it ran: its files were maybe never checked
                self._update(job_id, status="validating_files", error=None, finished_at=None)
                self._event(job_id, "Job resumed: validating its files again")
                self._start_validation(job_id)
                return self.get(job_id)
            ckpt = self._latest_checkpoint(job)
            self._update(job_id, status="queued", error=None, finished_at=None)
            self._event(job_id, "Job resumed: queued" + (f"; training continues from {ckpt.name}" if ckpt else ""))
            self.wake.notify_all()
        return self.get(job_id)

    def shutdown(self, wait_s: float | None = None) -> None:
        """Stop the workers; running jobs get SIGTERM (they checkpoint) and are marked failed, resumable."""
        with self.lock:
            self.stopping = True
            self.wake.notify_all()
            procs = dict(self.procs)
        for proc in procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + (self.settings.grace_s if wait_s is None else wait_s)
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for t in self.workers:
            t.join(timeout=5)

    # ---------------------------------------------------------------- reading

    def _run_events(self, job: dict[str, Any]) -> list[Any]:
        from loratui.pipeline.events import read_events

        path = Path(job["run_dir"]) / "events.jsonl"
        return read_events(path) if path.is_file() else []

    def _latest_checkpoint(self, job: dict[str, Any]) -> Path | None:
        from loratui.pipeline.train.step import complete_checkpoints

        found = complete_checkpoints(Path(job["run_dir"]) / "checkpoints")
        return found[-1] if found else None

    def _resolved(self, job: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters the run trained with (its current adapter version), else as asked."""
        from loratui.pipeline.runs import RunDir
        from loratui.pipeline.train.history import current_version

        asked = dict(job["hyperparameters"])
        try:
            version = current_version(RunDir(Path(job["run_dir"])))
        except (OSError, ValueError, KeyError):
            version = None
        if not version:
            return asked
        epochs = version.get("epochs")
        if isinstance(epochs, (int, float)):
            asked["n_epochs"] = int(epochs) if float(epochs).is_integer() else epochs
        if isinstance(version.get("effective_batch"), int):
            asked["batch_size"] = version["effective_batch"]  # examples per optimizer step, as OpenAI counts
        template_lr = float(self.settings.template.get("train", {}).get("lr", 2e-4))
        if isinstance(version.get("lr"), (int, float)) and template_lr:
            asked["learning_rate_multiplier"] = round(version["lr"] / template_lr, 6)
        return asked

    def _step_metrics(self, job: dict[str, Any]) -> str:
        """The job's result file, as OpenAI's: one CSV row per logged training step (and its validation loss)."""
        rows: dict[int, dict[str, Any]] = {}
        for event in self._run_events(job):
            if event.step == "train" and event.type == "metric" and event.at is not None:
                row = rows.setdefault(event.at, {})
                for ours, theirs in (("loss", "train_loss"), ("eval_loss", "valid_loss"), ("lr", "learning_rate")):
                    if ours in event.values:
                        row[theirs] = event.values[ours]
        columns = ("step", "train_loss", "valid_loss", "learning_rate")
        lines = [",".join(columns)]
        for step in sorted(rows):  # a resumed stretch repeats steps after its checkpoint: the later values win
            lines.append(
                ",".join([str(step)] + [f"{rows[step][c]:.6g}" if c in rows[step] else "" for c in columns[1:]])
            )
        return "\n".join(lines) + "\n"

    def _trained_tokens(self, job: dict[str, Any]) -> int | None:
        """Tokens trained on, over every stretch of training (a resumed one counts from its checkpoint)."""
        total = last = 0
        for event in self._run_events(job):
            if event.step != "train":
                continue
            if event.type == "metric" and "tokens" in event.values:
                last = int(event.values["tokens"])
            elif event.type == "done":
                total += int(event.summary.get("tokens", last))
                last = 0
            elif event.type in ("cancelled", "error"):
                total, last = total + last, 0
        return total or None

    def public(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job as OpenAI's API shows it, plus loratui's own details under ``loratui``."""
        hyper = self._resolved(job) if job["status"] != "validating_files" else dict(job["hyperparameters"])
        ckpt = self._latest_checkpoint(job) if job["status"] in ("failed", "cancelled") else None
        clean = self._for_client(job)
        error = {**job["error"], "message": clean(job["error"].get("message") or "")} if job["error"] else None
        return {
            "id": job["id"],
            "object": "fine_tuning.job",
            "created_at": job["created_at"],
            "error": error,
            "fine_tuned_model": job["fine_tuned_model"],
            "finished_at": job["finished_at"],
            "hyperparameters": hyper,
            "model": job["model"],
            "organization_id": "loratui",
            "result_files": job.get("result_files", []),
            "seed": job["seed"],
            "status": job["status"],
            "trained_tokens": job.get("trained_tokens"),
            "training_file": job["training_file"],
            "validation_file": job["validation_file"],
            "integrations": [],
            "estimated_finish": None,
            "metadata": job["metadata"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            # the run by its folder's name under the server's runs directory: no server path reaches a client
            "loratui": {
                "run_dir": Path(job["run_dir"]).name,
                "settings": job["settings"],
                "base": clean(job["base"]),
                "started_at": job["started_at"],
                "resumable_checkpoint": ckpt.name if ckpt else None,
            },
        }

    def _for_client(self, job: dict[str, Any]) -> Callable[[str], str]:
        """A function that takes the server's paths out of a text: an uploaded file by the client's name for
        it, the job's run by its folder's name (its files relative to it), any other absolute path by its
        last part. Built once per answer (the file records are read once)."""
        names: list[tuple[str, str]] = []
        for file_id in (job.get("training_file"), job.get("validation_file")):
            if file_id:
                try:
                    record = self.files.record(file_id)
                except (ApiError, OSError, ValueError):  # deleted or unreadable: its path is caught below
                    continue
                names.append((str(record["path"]), record["filename"]))
        run = Path(job["run_dir"])

        def clean(text: str) -> str:
            for path, name in names:
                text = text.replace(path, name)
            text = text.replace(str(run) + os.sep, "").replace(str(run), run.name)
            return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)

        return clean

    def get(self, job_id: str) -> dict[str, Any]:
        return self.public(self._load(job_id))

    def list(self, metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
        jobs = [
            j
            for j in self._records()
            if not metadata or all((j.get("metadata") or {}).get(k) == v for k, v in metadata.items())
        ]
        return [self.public(j) for j in jobs]

    def events(self, job_id: str) -> builtins.list[dict[str, Any]]:  # builtins: list is a method here
        """The job's events, newest first: its own (validated, queued, started ...) and its run's
        (metrics, logs, checkpoints, each step's end), without the progress ticks."""
        job = self._load(job_id)
        short = job_id.removeprefix("ftjob-")
        clean = self._for_client(job)
        merged: list[tuple[float, int, dict[str, Any]]] = []
        own = self._dir(job_id) / "events.jsonl"
        lines = own.read_text(encoding="utf-8").splitlines() if own.is_file() else []
        for n, raw in enumerate(lines):
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            merged.append(
                (
                    e["t"],
                    len(merged),
                    {
                        "id": f"ftevent-{short}-j{n}",
                        "object": "fine_tuning.job.event",
                        "created_at": int(e["t"]),
                        "level": e["level"],
                        "message": clean(e["message"]),
                        "data": e.get("data"),
                        "type": e.get("type", "message"),
                    },
                )
            )
        for n, event in enumerate(self._run_events(job)):
            if event.type not in _LIVE_OUTPUT_EVENTS or (event.type == "log" and event.level == "debug"):
                continue
            level, message, kind, data = _describe(event, Path(job["run_dir"]))
            merged.append(
                (
                    event.t,
                    len(merged),
                    {
                        "id": f"ftevent-{short}-r{n}",
                        "object": "fine_tuning.job.event",
                        "created_at": int(event.t),
                        "level": level,
                        "message": clean(message),
                        "data": data,
                        "type": kind,
                    },
                )
            )
        return [e for _, _, e in sorted(merged, key=lambda x: (x[0], x[1]), reverse=True)]

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The run's complete checkpoints, newest first, each usable as a model (base + that adapter)."""
        from loratui.pipeline.train.step import complete_checkpoints

        job = self._load(job_id)
        name = job["fine_tuned_model"] or f"ft:{job['base_name']}:{job['suffix']}:{job_id.removeprefix('ftjob-')}"
        out = []
        for path in complete_checkpoints(Path(job["run_dir"]) / "checkpoints"):
            step = int(path.name.rpartition("-")[2])
            out.append(
                {
                    "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": int(path.stat().st_mtime),
                    "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                    "fine_tuning_job_id": job_id,
                    "metrics": _checkpoint_metrics(path, step),
                    "step_number": step,
                }
            )
        return out[::-1]

    # ---------------------------------------------------------------- models

    def fine_tuned_models(self) -> dict[str, int]:
        """Model id -> when its job finished, for every succeeded job."""
        return {
            j["fine_tuned_model"]: j["finished_at"] or j["created_at"]
            for j in self._records()
            if j["status"] == "succeeded" and j["fine_tuned_model"]
        }

    def model_source(self, model: str) -> tuple[Path, Path | None, str] | None:
        """What serves ``model``: (the run directory, or the base for a checkpoint; the checkpoint or None;
        the job's ``model.base``), or None when no job made it."""
        name, _, ckpt = model.partition(":ckpt-step-")
        if ckpt and not ckpt.isdigit():
            return None
        for job in self._records():
            made = job["fine_tuned_model"] or (
                f"ft:{job['base_name']}:{job['suffix']}:{job['id'].removeprefix('ftjob-')}"
            )
            if made != name:
                continue
            if not ckpt:
                return (Path(job["run_dir"]), None, job["base"]) if job["status"] == "succeeded" else None
            path = Path(job["run_dir"]) / "checkpoints" / f"checkpoint-{ckpt}"
            return (Path(job["run_dir"]), path, job["base"]) if (path / "adapter_config.json").is_file() else None
        return None

    def delete_file(self, file_id: str) -> dict[str, Any]:
        """Delete an upload unless a job that has not ended uses it (a job being created checks it under the same lock)."""
        with self.lock:
            self.files.get(file_id)
            for job in self._records():
                if job["status"] not in TERMINAL and file_id in (job["training_file"], job["validation_file"]):
                    raise ApiError(
                        400,
                        f"{file_id} is used by the fine-tuning job {job['id']}, which has not "
                        "ended: cancel it or delete the file afterwards",
                        param="file_id",
                        code="file_in_use",
                    )
            return self.files.delete(file_id)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"()]+/)+([^\s/'\"()]+)")


def _describe(event: Any, run_dir: Path) -> tuple[str, str, str, dict[str, Any] | None]:
    """(level, message, type, data) of one run event, as a fine-tuning job event."""
    step = event.step
    if event.type == "metric":
        values = dict(event.values)
        if step == "train" and event.at is not None:
            data: dict[str, Any] = {"step": event.at}
            if "loss" in values:
                data["train_loss"] = values["loss"]
            if "eval_loss" in values:
                data["valid_loss"] = values["eval_loss"]
            data.update({k: v for k, v in values.items() if k not in ("loss", "eval_loss")})
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            return "info", f"Step {event.at}: {shown}", "metrics", data
        split = f" ({event.split})" if event.split else ""
        return "info", f"{step}{split}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()), "metrics", values
    if event.type == "log":
        message = event.message if event.message.startswith(f"{step}:") else f"{step}: {event.message}"
        return {"warning": "warn", "error": "error"}.get(event.level, "info"), message, "message", None
    if event.type == "checkpoint":
        return "info", f"Checkpoint saved at step {event.at}", "message", {"step": event.at}
    if event.type == "artifact":
        artifact = Path(event.path)
        where = artifact.relative_to(run_dir) if artifact.is_relative_to(run_dir) else artifact
        return "info", f"{step}: wrote {event.kind} {where}", "message", None
    if event.type == "done":
        took = f" in {event.seconds:.1f} s" if event.seconds is not None else ""
        return "info", f"{step} done{took}", "message", None
    if event.type == "error":
        return "error", f"{step}: {event.message}" + (f" ({event.hint})" if event.hint else ""), "message", None
    return (
        "warn",
        f"{step} cancelled" + (f"; resume from {Path(event.resume_from).name}" if event.resume_from else ""),
        "message",
        None,
    )


def _checkpoint_metrics(path: Path, step: int) -> dict[str, Any]:
    try:
        history = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        history = []
    metrics: dict[str, Any] = {"step": float(step)}
    for entry in history:
        if entry.get("step", 0) <= step:
            if "loss" in entry:
                metrics["train_loss"] = entry["loss"]
            if "eval_loss" in entry:
                metrics["valid_loss"] = entry["eval_loss"]
    return metrics


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_after(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)


def _is_our_process(pid: int, config: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config).encode() in cmdline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


def _stop_pid(pid: int, grace_s: float) -> None:
    """SIGTERM (the job saves a checkpoint), then SIGKILL after ``grace_s``."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        _signal_group(pid, signal.SIGKILL)
