"""The eval step on preference data: paired (DPO/ORPO) and unpaired (KTO) rows, written by hand in the processed
shape the data step's contract gives them, scored by a tiny model trained once; the log-probabilities are checked
against plain transformers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.eval import metrics as M
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER, load_step, run_step

IGNORE = -100
ROWS = 10  # preference rows written; eval.max_samples scores fewer
SAMPLES = 6
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(runs: Path, model: Path, *overrides: str) -> RunConfig:
    return load_config(
        None,
        [
            "name=p",
            f"runs_dir={runs}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.epochs=1",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "eval.max_new_tokens=6",
            f"eval.max_samples={SAMPLES}",
            "eval.comparison_examples=4",
            *overrides,
        ],
    )


def _step(name: str, cfg: RunConfig):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem])
    return code, result, mem


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_factory):
    """A run trained once (SFT on the quickstart data): its runs folder and the tiny base model."""
    runs = tmp_path_factory.mktemp("pref") / "runs"
    model = tiny_model_factory()
    assert _step("train", _cfg(runs, model))[0] == EXIT_OK
    return runs, model


def _first_trained(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE)


def _reply(messages_json: str) -> str:
    return json.loads(messages_json)[-1]["content"]


def _swap_reply(row: dict, other: dict) -> tuple[list[int], list[int], str]:
    """``row``'s prompt followed by ``other``'s reply: (input_ids, labels, reply text), as the data step would
    tokenize it (both share the chat template's tokens up to the reply)."""
    p, q = _first_trained(row["labels"]), _first_trained(other["labels"])
    return (
        row["input_ids"][:p] + other["input_ids"][q:],
        [IGNORE] * p + other["labels"][q:],
        _reply(other["messages"]),
    )


def _preference_rows(plain: list[dict], kind: str) -> list[dict]:
    """Paired: chosen = the row's own reply, rejected = the next row's. Unpaired: even rows keep their reply (good),
    odd rows get the next row's (bad)."""
    out = []
    for i, row in enumerate(plain[:ROWS]):
        other = plain[(i + 1) % len(plain)]
        ids, labels, text = _swap_reply(row, other)
        if kind == "paired":
            out.append({**row, "rejected_input_ids": ids, "rejected_labels": labels, "rejected": text})
        elif i % 2 == 0:
            out.append({**row, "preference_label": 1})
        else:
            messages = json.loads(row["messages"])
            messages[-1]["content"] = text
            out.append(
                {**row, "input_ids": ids, "labels": labels, "messages": json.dumps(messages), "preference_label": 0}
            )
    return out


def _preference_run(trained, tmp_path: Path, kind: str, *overrides: str, drop: str | None = None) -> RunConfig:
    """A copy of the trained run whose test split holds ``kind`` preference rows and whose manifest says so
    (the data step then finds the run's data up to date and leaves it alone)."""
    from datasets import Dataset, load_from_disk

    src, model = trained
    runs = tmp_path / "runs"
    shutil.copytree(src, runs)
    cfg = _cfg(runs, model, *overrides)
    data = RunDir.for_config(cfg).data
    manifest = DatasetManifest.load(data)
    split = data / manifest.splits["test"]
    rows = _preference_rows(load_from_disk(str(split)).to_list(), kind)
    shutil.rmtree(split)  # new files: the run's data may be hard links into the shared data cache
    ds = Dataset.from_list(rows)
    ds.remove_columns([drop]).save_to_disk(str(split)) if drop else ds.save_to_disk(str(split))
    manifest.preference = kind  # type: ignore[assignment]
    manifest.save(data)
    return cfg


def _logp(model, ids: list[int], labels: list[int]) -> float:
    """Summed log-probability of the labelled tokens, one sequence at a time (no batching, no padding)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(labels[1:])
    keep = (target != IGNORE).nonzero().squeeze(-1)
    return float(logp[keep, target[keep]].sum())


def _models(cfg: RunConfig, base_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(RunDir.for_config(cfg).adapter)
    ).eval()
    return {"base": base, "tuned": tuned}


def _scored_rows(cfg: RunConfig) -> list[dict]:
    from datasets import load_from_disk

    data = RunDir.for_config(cfg).data
    return load_from_disk(str(data / DatasetManifest.load(data).splits["test"])).to_list()[:SAMPLES]


def _read(cfg: RunConfig):
    out = RunDir.for_config(cfg).eval
    data = json.loads((out / "metrics.json").read_text())
    with (out / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    return data, reader.fieldnames, rows, (out / "comparison.md").read_text(), gens


# --------------------------------------------------------------------------------------------
# Paired rows
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paired(trained, tmp_path_factory):
    cfg = _preference_run(trained, tmp_path_factory.mktemp("paired"), "paired")
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result, mem


def test_paired_preference_metrics_match_plain_transformers(paired, trained):
    cfg, result, _ = paired
    data, _, _, _, gens = _read(cfg)
    (main,) = data["datasets"]
    assert main["preference"] == "paired" and main["rows"] == SAMPLES  # eval.max_samples honoured
    models = _models(cfg, trained[1])
    rows = _scored_rows(cfg)
    for name, model in models.items():
        chosen = [_logp(model, r["input_ids"], r["labels"]) for r in rows]
        rejected = [_logp(model, r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        diffs = [c - r for c, r in zip(chosen, rejected)]
        assert min(abs(d) for d in diffs) > 1e-3  # no near-tie for float noise to flip
        got = main["models"][name]["metrics"]
        assert got["preference_accuracy"] == sum(d > 0 for d in diffs) / SAMPLES, name
        assert got["reward_margin"] == pytest.approx(sum(diffs) / SAMPLES, rel=1e-4, abs=1e-4), name
        # per row, in generations.jsonl, in the order of the data
        assert [g[name]["chosen_logp"] for g in gens] == pytest.approx(chosen, rel=1e-4, abs=1e-4)
        assert [g[name]["rejected_logp"] for g in gens] == pytest.approx(rejected, rel=1e-4, abs=1e-4)
        # loss and perplexity are the chosen replies'
        tokens = sum(sum(t != IGNORE for t in r["labels"][1:]) for r in rows)
        assert got["loss"] == pytest.approx(-sum(chosen) / tokens, rel=1e-4)
    # the adapter moved the log-probabilities: base and tuned are two different figures, and their delta is kept
    base, tuned = main["models"]["base"]["metrics"], main["models"]["tuned"]["metrics"]
    assert tuned["reward_margin"] != pytest.approx(base["reward_margin"])
    assert main["delta"]["reward_margin"] == pytest.approx(tuned["reward_margin"] - base["reward_margin"])
    assert result.summary["tuned"]["preference_accuracy"] == tuned["preference_accuracy"]
    assert result.summary["delta"]["reward_margin"] == pytest.approx(main["delta"]["reward_margin"])


def test_paired_generation_metrics_use_the_chosen_reply(paired):
    cfg, _, _ = paired
    data, _, _, _, gens = _read(cfg)
    (main,) = data["datasets"]
    for name in ("base", "tuned"):
        assert main["models"][name]["generated"] == SAMPLES
        assert set(main["models"][name]["metrics"]) == set(M.ALL_METRICS)
    rows = _scored_rows(cfg)
    assert [g["reference"] for g in gens] == [_reply(r["messages"]) for r in rows]
    assert [g["rejected"] for g in gens] == [r["rejected"] for r in rows]
    assert all(isinstance(g["tuned"]["reply"], str) and g["tuned"]["scores"] for g in gens)


def test_paired_files_show_both_models_and_both_replies(paired):
    cfg, _, mem = paired
    _, columns, rows, text, _ = _read(cfg)
    assert tuple(columns) == ("dataset", "split", "model", "samples", *M.ALL_METRICS)
    assert [r["model"] for r in rows] == ["base", "tuned"]
    for r in rows:
        for k in M.ALL_METRICS:
            assert r[k] != "", (r["model"], k)
        assert 0 <= float(r["preference_accuracy"]) <= 1
    assert "| prompt | chosen | rejected | base reply | tuned reply |" in text
    assert "Preference data: loss and perplexity score the chosen replies" in text and "Paired rows:" in text
    assert "Unpaired rows:" not in text
    assert "| preference_accuracy |" in text and "| reward_margin |" in text
    assert text.index("## Worst pairs (tuned)") < text.index("## Best pairs (tuned)")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table) == 4 and all(line.count(" | ") == 4 for line in table)  # five cells each
    assert all(line.count("**") == 4 for line in table)  # each model's chosen - rejected figure
    plot = RunDir.for_config(cfg).eval / "plots" / "metrics.png"
    assert plot.read_bytes().startswith(PNG)
    tasks = {e.task for e in mem.of_type("progress") if e.step == "eval"}
    # the chosen log-probabilities come from the loss pass: one more pass per model, for the rejected replies
    assert {"base: rejected log-probs", "tuned: rejected log-probs"} <= tasks
    assert not any("chosen log-probs" in t for t in tasks)


def test_paired_without_loss_metrics_scores_the_chosen_replies_too(trained, tmp_path):
    cfg = _preference_run(
        trained, tmp_path, "paired", "eval.metrics=[preference_accuracy,reward_margin]", "eval.compare_base=false"
    )
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert set(result.summary["tuned"]) == {"preference_accuracy", "reward_margin"} and "base" not in result.summary
    tasks = {e.task for e in mem.of_type("progress") if e.step == "eval"}
    assert tasks == {"tuned: chosen log-probs", "tuned: rejected log-probs"}


def test_paired_manifest_without_rejected_columns_is_a_clear_error(trained, tmp_path):
    cfg = _preference_run(trained, tmp_path, "paired", drop="rejected_input_ids")
    code, _, mem = _step("eval", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "paired preference rows" in err.message and "rejected_input_ids" in err.message
    assert "loratui data" in (err.hint or "")


# --------------------------------------------------------------------------------------------
# Unpaired rows (KTO)
# --------------------------------------------------------------------------------------------


def test_unpaired_preference_metrics_from_the_log_ratio_to_the_base(trained, tmp_path):
    cfg = _preference_run(trained, tmp_path, "unpaired")
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    data, _, csv_rows, text, gens = _read(cfg)
    (main,) = data["datasets"]
    assert main["preference"] == "unpaired"
    rows = _scored_rows(cfg)
    labels = [r["preference_label"] for r in rows]
    assert labels == [1, 0, 1, 0, 1, 0]
    models = _models(cfg, trained[1])
    logps = {n: [_logp(m, r["input_ids"], r["labels"]) for r in rows] for n, m in models.items()}
    ratios = [t - b for t, b in zip(logps["tuned"], logps["base"])]
    assert min(abs(x) for x in ratios) > 1e-3
    tuned, base = main["models"]["tuned"], main["models"]["base"]
    agree = [(x > 0) == bool(y) for x, y in zip(ratios, labels)]
    assert tuned["metrics"]["preference_accuracy"] == sum(agree) / SAMPLES
    good = [x for x, y in zip(ratios, labels) if y]
    bad = [x for x, y in zip(ratios, labels) if not y]
    want = sum(good) / len(good) - sum(bad) / len(bad)
    assert tuned["metrics"]["reward_margin"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    # a figure of the tuned model against the base: the base has none, and there is no delta
    assert not set(M.PREFERENCE_METRICS) & set(base["metrics"]) and not set(M.PREFERENCE_METRICS) & set(main["delta"])
    assert [r["preference_accuracy"] != "" for r in csv_rows] == [False, True]
    # the bad completions are no reference: every prompt answered, the good rows scored; loss on the good ones
    assert tuned["generated"] == base["generated"] == SAMPLES
    assert all(isinstance(g["tuned"]["reply"], str) for g in gens)
    assert [g["tuned"]["scores"] is not None for g in gens] == [bool(y) for y in labels]
    f1 = [g["tuned"]["scores"]["token_f1"] for g in gens if g["label"]]
    assert tuned["metrics"]["token_f1"] == pytest.approx(sum(f1) / len(f1))
    tokens = sum(sum(t != IGNORE for t in r["labels"][1:]) for r, y in zip(rows, labels) if y)
    assert tuned["scored_tokens"] == tokens
    assert tuned["metrics"]["loss"] == pytest.approx(-sum(x for x, y in zip(logps["tuned"], labels) if y) / tokens)
    assert [g["label"] for g in gens] == labels and all("completion_logp" in g["base"] for g in gens)
    assert "| prompt | completion | label | base reply | tuned reply |" in text and "Unpaired rows:" in text
    assert "_(not generated)_" not in text and "Paired rows:" not in text
    assert "## Worst rows (tuned)" in text


def test_unpaired_without_the_base_is_skipped_with_a_log_line(trained, tmp_path):
    cfg = _preference_run(trained, tmp_path, "unpaired", "eval.compare_base=false")
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert not set(M.PREFERENCE_METRICS) & set(result.summary["tuned"]) and "loss" in result.summary["tuned"]
    logs = [e.message for e in mem.of_type("log") if e.step == "eval"]
    assert any("unpaired preference metrics" in m and "eval.compare_base is off" in m for m in logs)


# --------------------------------------------------------------------------------------------
# Runtimes and plots
# --------------------------------------------------------------------------------------------


def test_preference_metrics_are_pytorch_only_and_another_runtime_says_so():
    from loratui.pipeline.eval.examples import EvalSet
    from loratui.pipeline.eval.preference import score_set
    from loratui.pipeline.eval.runtimes import Example, LlamaCppModel, OnnxModel, TorchModel
    from loratui.pipeline.eval.step import Scores

    assert TorchModel.scores_preferences and not OnnxModel.scores_preferences
    assert not LlamaCppModel.scores_preferences

    class Fake:
        runtime, scores_preferences = "ONNX Runtime", False

        def nll(self, *a, **k):
            raise AssertionError("no pass for a runtime without preference metrics")

    rejected = Example(input_ids=[1, 3], labels=[IGNORE, 3], reference="no")
    s = EvalSet("main", "s", "test", [Example(input_ids=[1, 2], labels=[IGNORE, 2], rejected=rejected)], "paired")
    logs: list[str] = []
    result = Scores()
    score_set(Fake(), s, result, None, "tuned", "", lambda t, n: lambda k: None, logs.append, None)
    assert result.metrics == {} and logs == ["tuned: preference metrics are not computed for the ONNX Runtime runtime"]


def test_metrics_plot_draws_a_preference_panel(tmp_path):
    from loratui.pipeline.eval.plots import metrics_plot

    def scores(**metrics):
        return {"main": SimpleNamespace(metrics=metrics)}

    results = {
        "base": scores(loss=2.0, preference_accuracy=0.5, reward_margin=-0.2),
        "tuned": scores(loss=1.5, preference_accuracy=0.8, reward_margin=1.3),
    }
    assert metrics_plot(tmp_path / "m.png", results, "main", "base vs tuned")
    assert (tmp_path / "m.png").read_bytes().startswith(PNG)
    only = {"tuned": scores(preference_accuracy=0.8, reward_margin=1.3)}
    assert metrics_plot(tmp_path / "p.png", only, "main", "t") and (tmp_path / "p.png").stat().st_size > 5000
    assert not metrics_plot(tmp_path / "none.png", {"tuned": scores()}, "main", "t")
