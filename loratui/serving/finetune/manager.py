"""The job manager: creates jobs, checks their files, queues them and runs them one per slot; cancel, resume,
and a restarted server's recovery of what the last one left."""

from __future__ import annotations

import builtins
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from loratui.pipeline.process import Supervised, owned, stop_group
from loratui.pipeline.runs import atomic_write_text
from loratui.serving.errors import ApiError
from loratui.serving.finetune import models, request, runs, wire
from loratui.serving.finetune.files import FileStore, validate_training_file
from loratui.serving.finetune.records import NEW_JOB, TERMINAL, JobError, JobRecord, JobStore, Status
from loratui.serving.finetune.settings import JobSettings

_FILE_PARAMS = ("training_file", "validation_file")


def _now() -> int:
    return int(time.time())


class JobManager:
    """Files, jobs and the workers that run them; every public method is safe from any thread."""

    def __init__(self, settings: JobSettings, log: Callable[[str], None] = print):
        self.settings = settings
        self.log = log
        self.files = FileStore(settings.root)
        self.store = JobStore(settings.root)
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.procs: dict[str, Supervised] = {}
        self.workers: list[threading.Thread] = []
        self.stopping = False

    # ---------------------------------------------------------------- records

    def _update(self, job_id: str, **changes: Any) -> JobRecord:
        with self.lock:
            job = self.store.load(job_id).changed(**changes)
            self.store.save(job)
            return job

    def _event(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.store.add_event(job_id, message, level, data)

    # ---------------------------------------------------------------- creating

    def _sources(self, req: request.JobRequest) -> dict[str, Path]:
        """Where the request's uploads are, by parameter."""
        return {p: Path(self.files.for_job(p, file_id)["path"]) for p in _FILE_PARAMS if (file_id := getattr(req, p))}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a ``POST /v1/fine_tuning/jobs`` body, record the job and start validating its files."""
        from loratui.pipeline.config import dump_yaml

        req = request.parse(body)
        sources = self._sources(req)
        settings = req.settings()
        base, base_name = models.base_of(req.model, self.settings, self.store)
        short = secrets.token_hex(6)
        data = request.run_config(self.settings.template, req, settings, base, sources)
        data.update(name=f"ft-{short}", runs_dir=str(self.settings.runs_dir))
        if (
            base != self.settings.template.get("model", {}).get("base")
            and base not in self.settings.served_bases.values()
        ):
            data["model"]["trust_remote_code"] = False  # only the operator's own models may run their code
        cfg = request.validated(data)
        job_id = f"ftjob-{short}"
        folder = self.store.folder(job_id)
        folder.mkdir(parents=True)
        atomic_write_text(
            folder / "config.yaml",
            "# The run this fine-tuning job runs (`loratui run` this file).\n" + dump_yaml(cfg.model_dump(mode="json")),
        )
        with self.lock:
            asked = {
                "id": job_id,
                "seq": max((j.seq for j in self.store.all()), default=0) + 1,
                "created_at": _now(),
                "model": req.model,
                "base": base,
                "base_name": base_name,
                "suffix": req.suffix,
                "training_file": req.training_file,
                "validation_file": req.validation_file,
                "hyperparameters": req.hyper(),
                "method": req.method_type,
                **({"beta": req.beta(), "train_beta": cfg.train.beta} if req.method_type == "dpo" else {}),
                "seed": req.seed if req.seed is not None else cfg.train.seed,
                "metadata": req.metadata or None,
                "settings": settings,
                "run_dir": cfg.run_dir,
            }
            job = JobRecord.model_validate({**asked, **NEW_JOB})
            self.store.save(job)
        also = f" and validation file: {req.validation_file}" if req.validation_file else ""
        self._event(job_id, f"Validating training file: {req.training_file}{also}")
        self._start_validation(job_id)
        return self.public(job)

    def _start_validation(self, job_id: str) -> None:
        threading.Thread(target=self._validate, args=(job_id,), name=f"validate-{job_id}", daemon=True).start()

    def _validate(self, job_id: str) -> None:
        """The files again, now with the job's own data settings; then the queue."""
        param = "training_file"
        try:
            template = yaml.safe_load((self.store.folder(job_id) / "config.yaml").read_text(encoding="utf-8"))
            objective = template.get("train", {}).get("objective", "sft")  # a job from before objectives: sft
            job = self.store.load(job_id)
            for param in _FILE_PARAMS:
                file_id = getattr(job, param)
                if file_id:
                    try:
                        record = self.files.record(file_id)
                    except ApiError:
                        raise ApiError(400, f"{file_id} was deleted", param=param) from None
                    validate_training_file(Path(record["path"]), record["filename"], template, objective)
        except Exception as e:  # noqa: BLE001 - the job fails, the server stays up
            error = (
                JobError(code=f"invalid_{param}", message=e.message, param=param)
                if isinstance(e, ApiError)
                else JobError(code="validation_error", message=f"{type(e).__name__}: {e}", param=None)
            )
            with self.lock:
                if self.store.load(job_id).status == "validating_files":  # not cancelled meanwhile
                    self._finish(job_id, "failed", error)
            return
        with self.lock:
            if self.store.load(job_id).status != "validating_files":  # cancelled meanwhile
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
        """Jobs a previous server left running or validating: stop their process if it outlived that server;
        a running one fails (resumable), a validating one is validated again."""
        for job in self.store.all():
            if job.status not in ("running", "validating_files") and not job.stopping:
                continue
            if job.pid and owned(job.pid, str(self.store.folder(job.id) / "config.yaml")):  # not a recycled pid
                self.log(f"fine-tuning: stopping {job.id}'s process {job.pid}, left from the last server")
                stop_group(job.pid, self.settings.grace_s)
            if job.status == "validating_files":  # it never ran: check its files again
                self._event(job.id, "The server restarted: validating the files again")
                self._start_validation(job.id)
            elif job.status == "running":
                ckpt = runs.latest_checkpoint(job)
                message = "the server stopped while this job ran" + (
                    f"; its latest checkpoint ({ckpt.name}) is kept: POST /v1/fine_tuning/jobs/{job.id}/resume "
                    "continues from it"
                    if ckpt
                    else "; resume starts it again"
                )
                self._finish(job.id, "failed", JobError(code="server_restarted", message=message, param=None))
            else:
                self._update(job.id, stopping=False, pid=None)

    def _next(self) -> JobRecord | None:
        queued = [j for j in self.store.all() if j.status == "queued" and j.id not in self.procs]
        return min(queued, key=lambda j: j.seq) if queued else None

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
                    self._exited(job.id, proc.wait())
            except Exception as e:  # noqa: BLE001 - one job's trouble (a full disk ...) must not stop the worker
                self.log(f"fine-tuning: worker {slot}: {type(e).__name__}: {e}")
                if job is not None:
                    self._worker_failed(job.id, e)
                time.sleep(1)

    def _worker_failed(self, job_id: str, e: Exception) -> None:
        try:
            self.procs.pop(job_id, None)
            self._finish(
                job_id, "failed", JobError(code="server_error", message=f"{type(e).__name__}: {e}", param=None)
            )
        except Exception:  # noqa: BLE001, S110 - the worker goes on whatever this job's record says
            pass

    def _launch(self, job: JobRecord, slot: int) -> Supervised | None:
        folder = self.store.folder(job.id)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORATUI_JOB_ID": job.id}
        env.pop("LORATUI_API_KEY", None)
        if self.settings.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.gpus[slot % len(self.settings.gpus)]
        try:
            # SIGTERM when the server dies, whatever killed it: the job checkpoints instead of running on
            proc = Supervised(
                [sys.executable, *self.settings.command, "run", str(folder / "config.yaml")],
                env=env,
                output=folder / "output.log",
                parent_death=signal.SIGTERM,
            ).start()
        except OSError as e:
            error = JobError(code="launch_failed", message=f"cannot start the job: {e}", param=None)
            self._finish(job.id, "failed", error)
            return None
        self.procs[job.id] = proc
        resumed = job.started_at is not None
        self._update(
            job.id, status="running", pid=proc.pid, started_at=job.started_at or _now(), error=None, stopping=False
        )
        self._event(
            job.id,
            ("Fine-tuning job resumed" if resumed else "Fine-tuning job started")
            + f" (process {proc.pid}, run {job.run_dir})",
        )
        return proc

    def _exited(self, job_id: str, code: int) -> None:
        with self.lock:
            self.procs.pop(job_id, None)
            job = self.store.load(job_id)
            ckpt = runs.latest_checkpoint(job) if job.status == "cancelled" or self.stopping else None
            kept = f"; {ckpt.name} is kept" if ckpt else ""
            if job.status == "cancelled":
                self._update(job_id, pid=None, stopping=False, exit_code=code)
                self._event(
                    job_id,
                    "The job's process stopped" + (f"{kept} (resume continues from it)" if ckpt else ""),
                    data={"exit_code": code},
                )
            elif code == 0:
                self._finish(job_id, "succeeded", None, exit_code=code)
            elif self.stopping:
                message = "the server stopped while this job ran" + (
                    f"{kept}: resume continues from it" if ckpt else ""
                )
                self._finish(
                    job_id, "failed", JobError(code="server_stopped", message=message, param=None), exit_code=code
                )
            else:
                log = self.store.folder(job_id) / "output.log"
                self._finish(job_id, "failed", runs.failure(runs.run_events(job), log, code), exit_code=code)
            self.wake.notify_all()

    def _finish(self, job_id: str, status: Status, error: JobError | None, **more: Any) -> None:
        with self.lock:
            job = self.store.load(job_id)
            changes: dict[str, Any] = {"status": status, "error": error, "finished_at": _now(), "pid": None}
            changes.update(stopping=False, **more)
            if status == "succeeded":
                events = runs.run_events(job)
                changes["fine_tuned_model"] = job.model_name()
                changes["trained_tokens"] = runs.trained_tokens(events)
                changes["result_files"] = [self.files.add_result("step_metrics.csv", runs.step_metrics(events))["id"]]
            self._update(job_id, **changes)
        if status == "succeeded":
            self._event(job_id, f"New fine-tuned model created: {changes['fine_tuned_model']}")
            self._event(job_id, "The job has successfully completed")
        else:
            self._event(
                job_id,
                f"Job {status}" + (f": {error.message}" if error else ""),
                level="error" if status == "failed" else "warn",
            )

    # ---------------------------------------------------------------- cancel, resume, stop

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.store.load(job_id)
            if job.status in TERMINAL:
                raise ApiError(
                    400, f"the job is already {job.status}", param="fine_tuning_job_id", code="job_not_cancellable"
                )
            proc = self.procs.get(job_id)
            self._update(job_id, status="cancelled", finished_at=_now(), stopping=proc is not None)
            self._event(
                job_id,
                "Job cancelled" + (" (stopping its process: the latest checkpoint is kept)" if proc else ""),
                level="warn",
            )
        if proc is not None:
            proc.cancel(self.settings.grace_s)
        return self.get(job_id)

    def _check_resumable(self, job: JobRecord) -> None:
        def refuse(message: str, status: int = 400, code: str = "job_not_resumable") -> ApiError:
            return ApiError(status, message, param="fine_tuning_job_id", code=code)

        if job.status not in ("failed", "cancelled"):
            raise refuse(f"only a failed or cancelled job resumes; this one is {job.status}")
        if job.id in self.procs:
            raise refuse("the job's process is still stopping; retry in a moment", 409, "job_stopping")
        if job.error and job.error.code.startswith("invalid_"):
            raise refuse("the job's files failed validation: create a new job with fixed files")
        for param in _FILE_PARAMS:
            file_id = getattr(job, param)
            if file_id and not self.files.exists(file_id):
                raise refuse(f"the job's {param} {file_id} was deleted: create a new job")

    def resume(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.store.load(job_id)
            self._check_resumable(job)
            if job.started_at is None:  # cancelled before it ran: its files were maybe never checked
                self._update(job_id, status="validating_files", error=None, finished_at=None)
                self._event(job_id, "Job resumed: validating its files again")
                self._start_validation(job_id)
                return self.get(job_id)
            ckpt = runs.latest_checkpoint(job)
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
        _stop_all(list(procs.values()), self.settings.grace_s if wait_s is None else wait_s)
        for t in self.workers:
            t.join(timeout=5)

    # ---------------------------------------------------------------- reading

    def public(self, job: JobRecord) -> dict[str, Any]:
        """The job as OpenAI's API shows it, plus loratui's own details under ``loratui``."""
        validating = job.status == "validating_files"
        hyper = job.hyperparameters.model_dump() if validating else runs.resolved(job, self.settings.template)
        ckpt = runs.latest_checkpoint(job) if job.status in ("failed", "cancelled") else None
        return wire.public_job(job, hyper, ckpt, self._for_client(job))

    def _for_client(self, job: JobRecord) -> Callable[[str], str]:
        """A cleaner of texts for the client (:func:`wire.client_text`); the file records are read once."""
        uploads: list[tuple[str, str]] = []
        for file_id in (job.training_file, job.validation_file):
            if file_id:
                try:
                    record = self.files.record(file_id)
                except (ApiError, OSError, ValueError):  # deleted or unreadable: its path is caught anyway
                    continue
                uploads.append((str(record["path"]), record["filename"]))
        return wire.client_text(uploads, job.run_dir)

    def get(self, job_id: str) -> dict[str, Any]:
        return self.public(self.store.load(job_id))

    def list(self, metadata: dict[str, str] | None = None) -> builtins.list[dict[str, Any]]:
        jobs = [
            j
            for j in self.store.all()
            if not metadata or all((j.metadata or {}).get(k) == v for k, v in metadata.items())
        ]
        return [self.public(j) for j in jobs]

    def events(self, job_id: str) -> builtins.list[dict[str, Any]]:  # builtins: list is a method here
        """The job's events, newest first: its own and its run's (:func:`wire.job_events`)."""
        job = self.store.load(job_id)
        return wire.job_events(job, self.store.events(job_id), runs.run_events(job), self._for_client(job))

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The run's complete checkpoints, newest first, each usable as a model (base + that adapter)."""
        job = self.store.load(job_id)
        return wire.checkpoint_objects(job, runs.checkpoints(job))

    # ---------------------------------------------------------------- models

    def fine_tuned_models(self) -> dict[str, int]:
        """Model id -> when its job finished, for every succeeded job."""
        return models.fine_tuned(self.store.all())

    def model_source(self, model: str) -> tuple[Path, Path | None, str] | None:
        """What serves ``model`` (:func:`models.source`), or None when no job made it."""
        return models.source(model, self.store.all())

    def delete_file(self, file_id: str) -> dict[str, Any]:
        """Delete an upload unless a job that has not ended uses it (a job being created checks it under the same lock)."""
        with self.lock:
            self.files.get(file_id)
            for job in self.store.all():
                if job.status not in TERMINAL and file_id in (job.training_file, job.validation_file):
                    raise ApiError(
                        400,
                        f"{file_id} is used by the fine-tuning job {job.id}, which has not "
                        "ended: cancel it or delete the file afterwards",
                        param="file_id",
                        code="file_in_use",
                    )
            return self.files.delete(file_id)


def _stop_all(procs: list[Supervised], grace_s: float) -> None:
    """SIGTERM to every job's group, then wait for them all within ``grace_s``; SIGKILL for those still running."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
