"""The job record: a job.json written before the record was a model loads, and is written back the same."""

from __future__ import annotations

import json
from pathlib import Path

from loratui.serving.finetune import JobError, JobRecord

# As loratui 0.x wrote it for a job a server was running (no trained_tokens or result_files yet).
OLD = {
    "id": "ftjob-0123456789ab",
    "seq": 3,
    "created_at": 1700000000,
    "model": "tiny",
    "base": "/models/tiny",
    "base_name": "tiny",
    "suffix": "support",
    "training_file": "file-" + "a" * 24,
    "validation_file": None,
    "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2.0},
    "seed": 7,
    "metadata": {"team": "search"},
    "settings": {"lora.r": 4},
    "status": "running",
    "error": None,
    "fine_tuned_model": None,
    "finished_at": None,
    "started_at": 1700000100,
    "run_dir": "/runs/ft-0123456789ab",
    "pid": 4242,
    "exit_code": None,
    "stopping": False,
}


def test_an_old_record_loads_and_is_written_back_the_same(tmp_path: Path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(OLD, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    job = JobRecord.load(path)
    assert job.run_dir == Path("/runs/ft-0123456789ab") and job.result_files == [] and job.trained_tokens is None
    assert job.model_name() == "ft:tiny:support:0123456789ab"
    before = path.read_text(encoding="utf-8")
    job.save(path)
    assert path.read_text(encoding="utf-8") == before  # fields the record never had stay out of its file

    failed = job.changed(status="failed", error=JobError(code="server_restarted", message="m", param=None), pid=None)
    failed.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {
        **OLD,
        "status": "failed",
        "pid": None,
        "error": {"code": "server_restarted", "message": "m", "param": None},
    }
    assert "trained_tokens" not in data and "result_files" not in data
