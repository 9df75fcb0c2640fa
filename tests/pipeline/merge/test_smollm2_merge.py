"""The embedded SmolLM2 through the merge step: parity in the events and in the model card."""

from __future__ import annotations

import json

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

pytestmark = pytest.mark.real_model


def test_smollm2_merges_with_parity(tmp_path):
    cfg = load_config(
        "examples/quickstart.yaml",
        [f"runs_dir={tmp_path}", "train.max_steps=2", "train.keep_best=false", "merge.parity_prompts=4"],
    )
    assert run_step("train", load_step("train"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK
    mem = MemoryWriter()
    code, result, _ = run_step("merge", load_step("merge"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    parity = result.summary["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-3
    assert any("parity_max_abs_diff" in e.values for e in mem.of_type("metric"))
    merged = RunDir.for_config(cfg).merged
    card = (merged / "README.md").read_text()
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in card and "top-1 agreement 100.0%" in card
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in (
        merged / "tokenizer_config.json"
    ).read_text()
