"""A DPO-trained adapter through the whole pipeline: data -> train -> eval -> merge -> every export, then
served (the merged model in PyTorch, the GGUF in llama.cpp) and asked through the official ``openai`` client.
Nothing after training knows or needs to know how the adapter was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.run_all import run_all
from loratui.pipeline.runs import RunDir
from tests.pipeline.train.test_step_preference import ROOMS
from tests.serving.test_app import CHAT, Server

pytestmark = pytest.mark.slow  # every export of a trained run: in `make test-slow` (CI runs both)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_factory):
    model = tiny_model_factory(tokenizer="smollm2")  # a chat template and a pre-tokenizer llama.cpp knows
    tmp = tmp_path_factory.mktemp("dpo-pipeline")
    pairs = tmp / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Where is item {i}?",
            "chosen": f"Item {i} is in {ROOMS[i % 6]}.",
            "rejected": f"Perhaps {ROOMS[(i + 1) % 6]}, or anywhere else.",
        }
        for i in range(48)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            "name=dpo",
            f"runs_dir={tmp / 'runs'}",
            f"model.base={model}",
            f"data.source={pairs}",
            "train.objective=dpo",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "eval.max_new_tokens=8",
            "eval.max_samples=8",
            "export.formats=[safetensors,gguf,gguf-lora,onnx]",
            "export.gguf_quants=[f32]",
            "export.onnx_quants=[]",
        ],
    )
    from loratui.pipeline.events import MemoryWriter

    mem = MemoryWriter()
    code, _ = run_all(cfg, writers=[mem])
    assert code == 0, [e.message for e in mem.of_type("error")]
    return cfg, RunDir.for_config(cfg), code


def test_every_step_runs_on_a_dpo_adapter(dpo_run):
    cfg, run, code = dpo_run
    assert code == 0
    meta = json.loads((run.adapter / "loratui.json").read_text())
    assert meta["objective"] == "dpo"
    metrics = json.loads((run.eval / "metrics.json").read_text())
    models = metrics["datasets"][0]["models"]
    for name in ("base", "tuned"):
        assert 0.0 <= models[name]["metrics"]["preference_accuracy"] <= 1.0
    assert (run.merged / "model.safetensors").is_file()
    assert (run.merged / "loratui-merge.json").is_file()
    gguf = json.loads((run.exports / "gguf" / "report.json").read_text())
    assert gguf.get("files") and not gguf.get("refused"), gguf
    assert list((run.exports / "gguf").glob("*-lora-*.gguf"))
    assert json.loads((run.exports / "onnx" / "report.json").read_text()).get("files")


@pytest.mark.parametrize("kind", ["torch", "gguf"])
def test_the_dpo_model_is_served_and_answers(dpo_run, kind):
    from loratui.serving.app import create_app
    from loratui.serving.selection import choose
    from loratui.serving.server import ServeOptions, loader_for
    from loratui.serving.state import Limits, ServerState

    _, run, code = dpo_run
    assert code == 0
    choice = choose(run.path, kind, cuda=False)
    assert choice.kind == kind
    state = ServerState(model_id="dpo")
    opts = ServeOptions(target=Path(run.path), context_length=256)
    srv = Server(create_app(state, limits=Limits(max_tokens=16), loader=loader_for(choice, opts, lambda m: None)))
    try:
        assert srv.wait_ready()["status"] == "ok"
        reply = srv.client().chat.completions.create(model="dpo", messages=CHAT, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
    finally:
        srv.stop()
