"""scripts/gpu_check.py in its CPU mode: every part at tiny sizes, so the GPU check never rots (CI, `make test-slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu(tiny_model_factory, tmp_path):
    model = tiny_model_factory(tokenizer="smollm2")  # a chat template: the serve part chats with it
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--mode",
            "cpu",
            "--model",
            str(model),
            "--steps",
            "2",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
    )
    report = json.loads((out / "gpu-check.json").read_text())
    status = {part: record["status"] for part, record in report["parts"].items()}
    errors = {part: record.get("error") for part, record in report["parts"].items() if record["status"] == "failed"}
    assert done.returncode == 0 and not errors, (errors, done.stdout[-3000:])
    assert status == {
        "env": "ok",
        "lora": "ok",
        "qlora": "ok",
        "padding_free": "ok",
        "oom_fallback": "skipped",  # CUDA only
        "merge_eval": "ok",
        "serve": "ok",
        "estimate": "ok",
    }
    parts = {part: record.get("result", {}) for part, record in report["parts"].items()}
    assert len(parts["lora"]["losses"]) == 2 and parts["lora"]["tokens_per_s"] > 0
    assert parts["serve"]["tokens_per_s_1"] > 0 and parts["serve"]["tokens_per_s_8"] > 0
    assert parts["estimate"]["estimate"]["memory"]["parts"]["weights"] > 0
    table = (out / "gpu-check.md").read_text()
    assert "| lora | ok |" in table and "| oom_fallback | skipped |" in table
