"""Fine-tuning over HTTP, headless: uploaded files and fine-tuning jobs, kept on disk, run as subprocesses.

This is what ``/v1/files`` and ``/v1/fine_tuning/jobs`` (:mod:`loratui.serving.finetune.routes`) stand on. A
job is a run like any other: its config is the server's job template plus what the request asked for, and
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

Modules: ``files`` (uploads and their checks), ``request`` (the create-job body), ``records`` (job.json),
``manager`` (queue, workers, cancel, resume, recovery), ``runs`` (what a job's run directory says), ``wire``
(OpenAI's response shapes), ``steps`` (the pipeline steps used), ``routes``
(the HTTP routes; imported on its own, it needs FastAPI).
"""

from loratui.serving.finetune.files import FileStore, safe_filename, validate_training_file
from loratui.serving.finetune.manager import JobManager
from loratui.serving.finetune.records import JobError, JobRecord
from loratui.serving.finetune.request import JobRequest, client_settings
from loratui.serving.finetune.settings import JobSettings
from loratui.serving.finetune.wire import page

__all__ = [
    "FileStore",
    "JobError",
    "JobManager",
    "JobRecord",
    "JobRequest",
    "JobSettings",
    "client_settings",
    "page",
    "safe_filename",
    "validate_training_file",
]
