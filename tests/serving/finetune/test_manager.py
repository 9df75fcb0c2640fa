"""The job manager without HTTP: which models a job may name, resume's checks, a restarted server's recovery."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loratui.pipeline.config import load_config
from loratui.serving.errors import ApiError
from loratui.serving.finetune import JobManager, JobSettings
from tests.serving.finetune.test_api import TEMPLATE, _chat_jsonl


def _wait_status(jobs: JobManager, job_id: str, status: str) -> dict:
    deadline = time.monotonic() + 30
    while (job := jobs.get(job_id))["status"] != status:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_the_manager_guards_models_files_and_resumes(tmp_path):
    """Without workers (nothing runs): which models a job may name, checkpoint names, and resume's checks."""
    template = load_config(None, [*TEMPLATE, "model.trust_remote_code=true"]).model_dump(mode="json")
    settings = JobSettings(
        root=tmp_path / "jobs",
        runs_dir=tmp_path / "runs",
        template=template,
        served_bases={"tiny": str(tmp_path / "tiny")},
    )
    jobs = JobManager(settings, log=lambda m: None)
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(_chat_jsonl(8))
    f = jobs.files.add(upload, "u.jsonl", "fine-tune", template)
    for model in (str(tmp_path), "/etc", "../runs/x"):
        with pytest.raises(ApiError, match="not a model this server fine-tunes"):
            jobs.create({"model": model, "training_file": f["id"]})
    with pytest.raises(ApiError, match="hyperparameters: expected an object"):
        jobs.create({"model": "tiny", "training_file": f["id"], "hyperparameters": [1]})
    hub = jobs.create({"model": "Qwen/Qwen2.5-0.5B-Instruct", "training_file": f["id"]})
    assert yaml.safe_load((settings.root / "jobs" / hub["id"] / "config.yaml").read_text())["model"] == {
        **template["model"],
        "base": "Qwen/Qwen2.5-0.5B-Instruct",
        "trust_remote_code": False,
    }
    jobs.cancel(hub["id"])  # the operator trusts its own models' code, not a client's choice

    job = jobs.create({"model": "tiny", "training_file": f["id"]})
    assert yaml.safe_load((settings.root / "jobs" / job["id"] / "config.yaml").read_text())["model"][
        "trust_remote_code"
    ]
    _wait_status(jobs, job["id"], "queued")
    assert jobs.cancel(job["id"])["status"] == "cancelled"
    assert jobs.resume(job["id"])["status"] == "validating_files"  # it never ran: its files are checked again
    _wait_status(jobs, job["id"], "queued")
    with pytest.raises(ApiError, match="used by the fine-tuning job"):
        jobs.delete_file(f["id"])
    jobs.cancel(job["id"])
    assert jobs.delete_file(f["id"])["deleted"]
    with pytest.raises(ApiError, match="was deleted"):
        jobs.resume(job["id"])
    short = job["id"].removeprefix("ftjob-")
    assert jobs.model_source(f"ft:tiny::{short}:ckpt-step-1/../../..") is None
    assert jobs.model_source(f"ft:tiny::{short}") is None  # not succeeded


def test_a_new_server_stops_what_the_last_one_left_running(tmp_path):
    """Recovery: a job whose process outlived its server is stopped and failed (resumable); a job caught
    validating its files is validated again."""
    template = load_config(None, TEMPLATE).model_dump(mode="json")
    settings = JobSettings(
        root=tmp_path / "jobs",
        runs_dir=tmp_path / "runs",
        template=template,
        served_bases={"tiny": str(tmp_path / "tiny")},
        grace_s=10,
    )
    old = JobManager(settings, log=lambda m: None)
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(_chat_jsonl(8))
    f = old.files.add(upload, "u.jsonl", "fine-tune", template)
    running, validating = (old.create({"model": "tiny", "training_file": f["id"]}) for _ in range(2))
    for job in (running, validating):
        _wait_status(old, job["id"], "queued")
    config = settings.root / "jobs" / running["id"] / "config.yaml"
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(config)], start_new_session=True
    )
    old._update(running["id"], status="running", pid=leftover.pid, started_at=1)  # as a killed server left them
    old._update(validating["id"], status="validating_files")

    new = JobManager(settings, log=lambda m: None)
    new.recover()
    assert leftover.wait(timeout=10) == -signal.SIGTERM  # stopped with SIGTERM, so a real job checkpoints
    failed = new.get(running["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_restarted"
    assert "resume starts it again" in failed["error"]["message"]  # no checkpoint was written
    _wait_status(new, validating["id"], "queued")
    assert any("validating the files again" in e["message"] for e in new.events(validating["id"]))


def test_serve_puts_the_jobs_beside_the_served_run(tmp_path):
    from argparse import Namespace

    from loratui.cli.serve import job_settings

    run = tmp_path / "runs" / "quickstart"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: quickstart\n")
    settings = job_settings(Namespace(config=None), load_config(None, ["serve.api_key=secret"]), run)
    assert settings.runs_dir == (tmp_path / "runs").resolve() and settings.root == settings.runs_dir / ".fine_tuning"
    assert (settings.slots, settings.gpus) == (1, [])  # no CUDA here: one job at a time
    assert settings.template["serve"]["api_key"] is None  # the template is the --config file, else the defaults
    other = job_settings(
        Namespace(config=None),
        load_config(None, [f"serve.jobs_dir={tmp_path / 'j'}", "serve.job_slots=2"]),
        tmp_path / "m.gguf",
    )
    assert (other.root, other.slots, other.runs_dir) == (tmp_path / "j", 2, Path("runs").resolve())
