"""The train step with a preference objective on a tiny model: DPO, ORPO, KTO, SFT -> DPO by stack, cancel and
exact resume, and the objectives refused with the data they cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, EXIT_USER, StopFlag, load_step, run_step
from loratui.pipeline.train import history as hist
from tests.pipeline.train.test_step import _cfg, _train

ROOMS = ["the reading room", "the map room", "the archive", "the music room", "the study hall", "the annex"]


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    """40 pairs: a short right answer against a longer wrong one."""
    path = tmp_path / "pairs.jsonl"
    rows = []
    for i in range(40):
        room = ROOMS[i % len(ROOMS)]
        rows.append(
            {
                "prompt": f"Where is item {i}?",
                "chosen": f"Item {i} is in {room}.",
                "rejected": f"Item {i} could be anywhere, perhaps {ROOMS[(i + 1) % len(ROOMS)]} or not.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def unpaired(tmp_path: Path) -> Path:
    path = tmp_path / "kto.jsonl"
    rows = [
        {"prompt": f"Where is item {i}?", "completion": f"Item {i} is in {ROOMS[i % 6]}.", "label": i % 2 == 0}
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _figures(mem: MemoryWriter, name: str, split: str = "train") -> list[float]:
    return [e.values[name] for e in mem.of_type("metric") if e.split == split and name in e.values]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_pair_objectives_train_and_the_rewards_separate(tmp_path, tiny_llama, pairs, objective):
    cfg = _cfg(
        tmp_path,
        tiny_llama,
        f"data.source={pairs}",
        f"train.objective={objective}",
        "train.epochs=3",
        "data.val_ratio=0.1",
    )
    code, result, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    margins = _figures(mem, "reward_margin")
    assert len(margins) == result.summary["steps"] > 5
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3  # the chosen replies pulled away from the rejected
    assert _figures(mem, "eval_reward_accuracy", "validation")
    entry = hist.current_version(RunDir.for_config(cfg))
    assert entry.objective == objective and entry.beta == 0.1
    assert "reward_accuracy_last" in entry.metrics


def test_kto_trains_on_unpaired_rows(tmp_path, tiny_llama, unpaired):
    cfg = _cfg(tmp_path, tiny_llama, f"data.source={unpaired}", "train.objective=kto", "train.epochs=2")
    code, _, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert _figures(mem, "kl") and _figures(mem, "reward_chosen")


def test_sft_then_dpo_by_stack(tmp_path, tiny_llama, pairs):
    sft = _cfg(tmp_path, tiny_llama, "train.epochs=1")
    assert _train(sft)[0] == EXIT_OK
    dpo = _cfg(
        tmp_path, tiny_llama, f"data.source={pairs}", "train.objective=dpo", "train.mode=stack", "train.epochs=1"
    )
    code, result, mem = _train(dpo)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert any("stack: merging" in e.message for e in mem.of_type("log"))
    versions = {v.version: v for v in hist.AdapterHistory.load(RunDir.for_config(dpo)).versions}
    assert versions[1].objective == "sft" and versions[2].objective == "dpo" and versions[2].stack == [1]
    # at the first step the adapter is fresh: the policy equals its reference, the SFT model
    assert _figures(mem, "reward_margin")[0] == pytest.approx(0.0, abs=0.05)


def test_dpo_cancel_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama, pairs):
    def cfg(name: str):
        return _cfg(tmp_path, tiny_llama, f"data.source={pairs}", "train.objective=dpo", "train.epochs=2", name=name)

    code, _, full = _train(cfg("full"))
    assert code == EXIT_OK
    want = dict(zip([e.at for e in full.of_type("metric") if "loss" in e.values], _figures(full, "loss")))
    cut = cfg("cut")
    stop = StopFlag()
    seen = MemoryWriter()

    def probe(event):
        seen(event)
        if event.type == "progress" and event.task == "train" and event.current >= 3:
            stop.set()

    code, result, _ = run_step("train", load_step("train"), cut, writers=[probe], stop=stop)
    assert code == EXIT_CANCELLED and result.resume_from
    cut.train.resume = True
    code, _, rest = _train(cut)
    assert code == EXIT_OK
    got = {}
    for mem in (seen, rest):
        got.update({e.at: e.values["loss"] for e in mem.of_type("metric") if "loss" in e.values})
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), (step, got[step], loss)


def test_padding_free_and_padded_dpo_runs_give_the_same_losses(tmp_path, tiny_llama, pairs):
    runs = {}
    for padding_free in (True, False):
        cfg = _cfg(
            tmp_path,
            tiny_llama,
            f"data.source={pairs}",
            "train.objective=dpo",
            "train.max_steps=3",
            f"train.padding_free={str(padding_free).lower()}",
            name=f"pf-{padding_free}",
        )
        code, _, mem = _train(cfg)
        assert code == EXIT_OK
        runs[padding_free] = _figures(mem, "loss")
    assert runs[True] == pytest.approx(runs[False], rel=1e-3)


def test_dpo_on_plain_examples_is_refused(tmp_path, tiny_llama):
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, "train.objective=dpo"))
    assert code == EXIT_USER
    assert "needs preference data" in mem.of_type("error")[0].message


def test_dpo_continuing_an_adapter_is_refused_with_stack_as_the_way(tmp_path, tiny_llama, pairs):
    assert _train(_cfg(tmp_path, tiny_llama, "train.epochs=1"))[0] == EXIT_OK
    cfg = _cfg(tmp_path, tiny_llama, f"data.source={pairs}", "train.objective=dpo", "train.mode=continue")
    code, _, mem = _train(cfg)
    assert code == EXIT_USER
    error = mem.of_type("error")[0]
    assert "train.mode=continue" in error.message and "train.mode=stack" in error.hint


def test_dpo_on_unpaired_rows_is_refused(tmp_path, tiny_llama, unpaired):
    code, _, mem = _train(_cfg(tmp_path, tiny_llama, f"data.source={unpaired}", "train.objective=dpo"))
    assert code == EXIT_USER
    assert "needs pairs" in mem.of_type("error")[0].message


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_dpo_trains_a_qlora_or_dora_adapter(tmp_path, tiny_llama, pairs, method):
    cfg = _cfg(
        tmp_path,
        tiny_llama,
        f"data.source={pairs}",
        "train.objective=dpo",
        "train.max_steps=2",
        f"lora.method={method}",
    )
    code, _, mem = _train(cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert _figures(mem, "loss")[0] == pytest.approx(0.6931, abs=1e-3)  # fresh adapter: the policy is its reference
    assert hist.current_version(RunDir.for_config(cfg)).method == method
