"""The embedded SmolLM2 trains through the real step: padding-free with the shared system-prompt prefix."""

from __future__ import annotations

import json

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

pytestmark = pytest.mark.real_model


def test_smollm2_trains_a_few_steps(tmp_path):
    cfg = load_config(
        "examples/quickstart.yaml", [f"runs_dir={tmp_path}", "train.max_steps=3", "train.keep_best=false"]
    )
    mem = MemoryWriter()
    code, result, _ = run_step("train", load_step("train"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    losses = [e.values["loss"] for e in mem.of_type("metric") if e.split == "train"]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert any("padding-free" in e.message for e in mem.of_type("log"))
    run = RunDir.for_config(cfg)
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["task_type"] == "CAUSAL_LM"
    assert result.summary["tokens"] > 0
