"""The embedded SmolLM2 through the evaluate step: real chat-template prompts, real stop tokens."""

from __future__ import annotations

import json

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

pytestmark = pytest.mark.real_model


def test_smollm2_base_and_tuned_answer_the_test_questions(tmp_path):
    cfg = load_config(
        "examples/quickstart.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.max_steps=2",
            "train.keep_best=false",
            "eval.max_samples=4",
            "eval.max_new_tokens=24",
        ],
    )
    assert run_step("train", load_step("train"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK
    mem = MemoryWriter()
    code, result, _ = run_step("eval", load_step("eval"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    run = RunDir.for_config(cfg)
    gens = [json.loads(x) for x in (run.eval / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4
    for g in gens:
        for model in ("base", "tuned"):
            reply = g[model]["reply"]
            # a reply to the question: not empty, no template tokens, not the start of another turn
            assert reply and "<|im_" not in reply and not reply.startswith(("assistant", "user")), reply
    assert 1.0 < result.summary["base"]["perplexity"] < 200
    assert (run.eval / "plots" / "metrics.png").stat().st_size > 5000
