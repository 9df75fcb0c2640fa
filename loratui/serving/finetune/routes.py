"""OpenAI's files and fine-tuning jobs API, over :class:`~loratui.serving.finetune.JobManager`.

Routes: ``POST /v1/files`` (multipart: ``file``, ``purpose=fine-tune``; validated by the data step's row
checks, a bad file is answered 400 with the validation summary), ``GET /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``;
``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs`` (cursor pages, ``metadata[k]=v`` filters),
``GET .../{id}``, ``GET .../{id}/events``, ``GET .../{id}/checkpoints``, ``POST .../{id}/cancel`` and
``POST .../{id}/resume``. Uploads have their own size limit (``serve.max_upload_mb``), counted as the
body streams in, with or without a Content-Length.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loratui.serving.errors import ApiError
from loratui.serving.finetune.manager import JobManager
from loratui.serving.finetune.wire import page

UPLOAD_ROUTE = "/v1/files"
JOBS_ROUTE = "/v1/fine_tuning/jobs"


def add_routes(app: FastAPI, jobs: JobManager, max_upload_bytes: int) -> None:
    _file_routes(app, jobs, max_upload_bytes)
    _job_routes(app, jobs)


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit():
        raise ApiError(400, f"limit: expected an integer, got {raw!r}", param="limit")
    return int(raw)


def _file_routes(app: FastAPI, jobs: JobManager, max_upload_bytes: int) -> None:
    @app.post(UPLOAD_ROUTE)
    async def upload(request: Request) -> Any:
        form = await _read_form(request, max_upload_bytes)
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile) or not upload.filename:
                raise ApiError(400, "file: required (a file part named `file`)", param="file")
            if not isinstance(purpose, str) or not purpose:
                raise ApiError(400, "purpose: required ('fine-tune')", param="purpose")
            return await asyncio.to_thread(_store, jobs, upload, purpose)
        finally:
            await form.close()

    @app.get(UPLOAD_ROUTE)
    async def list_files(request: Request) -> Any:
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: expected 'asc' or 'desc', got {order!r}", param="order")
        items = await asyncio.to_thread(jobs.files.list, q.get("purpose"), order)
        return page(items, q.get("after"), _limit(request, 10_000), most=10_000)

    @app.get(UPLOAD_ROUTE + "/{file_id}")
    async def get_file(file_id: str) -> Any:
        return jobs.files.get(file_id)

    @app.get(UPLOAD_ROUTE + "/{file_id}/content")
    async def file_content(file_id: str) -> Any:
        record = jobs.files.record(file_id)
        return FileResponse(record["path"], filename=record["filename"], media_type="application/octet-stream")

    @app.delete(UPLOAD_ROUTE + "/{file_id}")
    async def delete_file(file_id: str) -> Any:
        return await asyncio.to_thread(jobs.delete_file, file_id)


def _too_large(max_upload_bytes: int, length: str | None = None) -> ApiError:
    size = f"of {length} bytes " if length else ""
    return ApiError(
        413,
        f"the upload {size}is over this server's limit of {max_upload_bytes} bytes (serve.max_upload_mb)",
        code="file_too_large",
    )


async def _read_form(request: Request, max_upload_bytes: int) -> FormData:
    """The multipart body, read as it streams in and refused (413) once it is over ``max_upload_bytes``."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_upload_bytes:
        raise _too_large(max_upload_bytes, length)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload the file as multipart/form-data with the fields `file` and `purpose`", param="file")

    async def limited() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_upload_bytes:
                raise _too_large(max_upload_bytes)
            yield chunk

    try:
        return await MultiPartParser(request.headers, limited(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise ApiError(400, f"the multipart body cannot be read: {e.message}", param="file") from None


def _store(jobs: JobManager, upload: UploadFile, purpose: str) -> dict[str, Any]:
    """Copy the parsed upload next to the store (same file system), then validate and record it."""
    jobs.files.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=jobs.files.root)
    try:
        with open(fd, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        return jobs.files.add(Path(tmp), upload.filename or "upload", purpose, jobs.settings.template)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _job_routes(app: FastAPI, jobs: JobManager) -> None:
    @app.post(JOBS_ROUTE)
    async def create_job(request: Request) -> Any:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return await asyncio.to_thread(jobs.create, body)

    @app.get(JOBS_ROUTE)
    async def list_jobs(request: Request) -> Any:
        q = request.query_params
        metadata = {k[len("metadata[") : -1]: v for k, v in q.items() if k.startswith("metadata[") and k.endswith("]")}
        items = await asyncio.to_thread(jobs.list, metadata or None)
        return page(items, q.get("after"), _limit(request))

    @app.get(JOBS_ROUTE + "/{job_id}")
    async def get_job(job_id: str) -> Any:
        return await asyncio.to_thread(jobs.get, job_id)

    @app.get(JOBS_ROUTE + "/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Any:
        items = await asyncio.to_thread(jobs.events, job_id)
        return page(items, request.query_params.get("after"), _limit(request))

    @app.get(JOBS_ROUTE + "/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, request: Request) -> Any:
        items = await asyncio.to_thread(jobs.checkpoints, job_id)
        return page(items, request.query_params.get("after"), _limit(request, 10))

    @app.post(JOBS_ROUTE + "/{job_id}/cancel")
    async def cancel_job(job_id: str) -> Any:
        return await asyncio.to_thread(jobs.cancel, job_id)

    @app.post(JOBS_ROUTE + "/{job_id}/resume")
    async def resume_job(job_id: str) -> Any:
        return await asyncio.to_thread(jobs.resume, job_id)

    @app.post(JOBS_ROUTE + "/{job_id}/pause")
    async def pause_job(job_id: str) -> Any:
        jobs.get(job_id)
        raise ApiError(
            400,
            "pause is not supported here: cancel stops the job and keeps its latest checkpoint, and "
            f"POST {JOBS_ROUTE}/{job_id}/resume continues from it",
            param="fine_tuning_job_id",
        )
