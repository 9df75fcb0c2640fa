"""The evaluate step on tiny models: files and their schemas, the comparison, retention after a stack run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.eval.metrics import ALL_METRICS, PREFERENCE_METRICS
from loratui.pipeline.events import EventSink, MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, EXIT_USER, StopFlag, load_step, run_step

PNG = b"\x89PNG\r\n\x1a\n"
# what a run on plain (non-preference) data computes: every metric but the preference ones
PLAIN_METRICS = tuple(k for k in ALL_METRICS if k not in PREFERENCE_METRICS)


def _cfg(tmp_path: Path, model: Path, *overrides: str, name: str = "e") -> RunConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.epochs=1",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "eval.max_new_tokens=6",
            "eval.comparison_examples=4",
            *overrides,
        ],
    )


def _step(name: str, cfg: RunConfig, stop: StopFlag | None = None):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem], stop=stop)
    return code, result, mem


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_factory):
    """One tiny run trained once and evaluated once for the tests that only read its files."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = _cfg(tmp, tiny_model_factory())
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result, mem


def test_metrics_csv_has_a_row_per_model_with_fixed_columns(trained):
    cfg, _, _ = trained
    out = RunDir.for_config(cfg).eval
    with (out / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (
        "dataset",
        "split",
        "model",
        "samples",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "bleu",
        "exact_match",
        "token_f1",
        "contains",
        "loss",
        "perplexity",
        "preference_accuracy",
        "reward_margin",
    )
    assert [(r["dataset"], r["model"]) for r in rows] == [("main", "base"), ("main", "tuned")]
    for r in rows:
        assert r["split"] == "test" and r["samples"] == "29"
        for k in PLAIN_METRICS:
            assert r[k] != "", (r["model"], k)
            float(r[k])
        for k in PREFERENCE_METRICS:  # not preference data: left empty
            assert r[k] == "", (r["model"], k)


def test_metrics_json_schema_and_deltas(trained):
    cfg, result, _ = trained
    data = json.loads((RunDir.for_config(cfg).eval / "metrics.json").read_text())
    assert data["schema"] == 1 and data["run"] == "e"
    assert data["target"]["kind"] == "adapter" and data["target"]["version"] == 1
    assert data["decoding"] == {"strategy": "greedy", "max_new_tokens": 6}
    (main,) = data["datasets"]
    assert main["name"] == "main" and main["split"] == "test" and main["rows"] == 29
    base, tuned = main["models"]["base"], main["models"]["tuned"]
    assert set(base["metrics"]) == set(tuned["metrics"]) == set(PLAIN_METRICS)
    assert "preference" not in main
    assert base["generated"] == tuned["generated"] == 29 and tuned["scored_tokens"] > 0
    for k in PLAIN_METRICS:
        assert main["delta"][k] == pytest.approx(tuned["metrics"][k] - base["metrics"][k])
    assert 0 <= tuned["metrics"]["token_f1"] <= 1 and 0 <= tuned["metrics"]["bleu"] <= 100
    # training on the quickstart answers lowers their loss even for a tiny random model
    assert tuned["metrics"]["loss"] < base["metrics"]["loss"]
    assert result.summary["delta"]["loss"] == pytest.approx(main["delta"]["loss"])


def test_comparison_shows_worst_and_best_side_by_side(trained):
    cfg, _, _ = trained
    out = RunDir.for_config(cfg).eval
    text = (out / "comparison.md").read_text()
    assert "| metric | base | tuned | delta |" in text
    assert text.index("## Worst cases") < text.index("## Best cases")
    assert text.count("**Prompt**") == 4 and text.count("**Base**") == 4 and text.count("**Tuned**") == 4
    assert "Preference data" not in text and "| chosen |" not in text and "preference_accuracy" not in text
    assert "test.jsonl:" in text  # each case names its row
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 29 and set(gens[0]) == {"dataset", "source", "prompt", "reference", "fact", "base", "tuned"}
    assert set(gens[0]["tuned"]) == {"reply", "scores"}
    assert gens[0]["fact"] and gens[0]["tuned"]["scores"]["contains"] in (0.0, 1.0)
    assert gens[0]["prompt"] and not gens[0]["prompt"].startswith("<|")  # the question, not the template


def test_plots_are_non_empty_pngs(trained):
    cfg, _, mem = trained
    plots = RunDir.for_config(cfg).eval / "plots"
    for name in ("loss.png", "metrics.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert not (plots / "retention.png").exists()  # one dataset only
    kinds = [e.kind for e in mem.of_type("artifact")]
    assert kinds.count("plot") == 2 and "eval-metrics-csv" in kinds


def test_events_report_progress_and_metrics(trained):
    _, _, mem = trained
    tasks = {e.task for e in mem.of_type("progress") if e.step == "eval"}
    assert {"base: generate", "tuned: generate", "base: loss", "tuned: loss"} <= tasks
    splits = {e.split for e in mem.of_type("metric") if e.step == "eval"}
    assert splits == {"base", "tuned"}
    assert not any("log-probs" in (t or "") for t in tasks)  # no preference pass on plain data
    assert not any("preference" in e.message for e in mem.of_type("log") if e.step == "eval")


def test_retention_after_a_stack_run(tmp_path, tiny_llama):
    first = _cfg(tmp_path, tiny_llama, "eval.max_samples=5")
    assert _step("train", first)[0] == EXIT_OK
    code, before, _ = _step("eval", first)
    assert code == EXIT_OK and "retention" not in before.summary
    second = _cfg(tmp_path, tiny_llama, "data.source=quickstart-more", "train.mode=stack", "eval.max_samples=5")
    assert _step("train", second)[0] == EXIT_OK
    code, result, mem = _step("eval", second)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    out = RunDir.for_config(second).eval
    data = json.loads((out / "metrics.json").read_text())
    names = [d["name"] for d in data["datasets"]]
    assert names == ["main", "v1: quickstart"]
    assert data["datasets"][0]["source"] == "quickstart-more"
    assert data["target"]["version"] == 2 and len(data["target"]["stack"]) == 1
    old = data["datasets"][1]
    assert old["split"] == "test" and old["rows"] == 5
    assert set(old["models"]) == {"base", "tuned"} and "contains" in old["delta"]
    with (out / "metrics.csv").open() as f:
        rows = [(r["dataset"], r["model"]) for r in csv.DictReader(f)]
    assert rows == [("main", "base"), ("main", "tuned"), ("v1: quickstart", "base"), ("v1: quickstart", "tuned")]
    assert (out / "plots" / "retention.png").read_bytes().startswith(PNG)
    assert "## Retention: v1: quickstart" in (out / "comparison.md").read_text()
    assert set(result.summary["retention"]) == {"v1: quickstart"}
    # the base is scored before the stack merge touches its weights: the same figure as in the first eval
    assert old["models"]["base"]["metrics"]["loss"] == pytest.approx(before.summary["base"]["loss"], rel=1e-6)
    # and v1's facts are still partly held by v2 stacked on v1, unlike the base
    assert old["models"]["tuned"]["metrics"]["loss"] < old["models"]["base"]["metrics"]["loss"]


def test_merged_model_directory_can_be_evaluated(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(tmp_path, tiny_llama, "eval.max_samples=4", "eval.compare_base=false")
    assert _step("train", cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    merged = tmp_path / "merged"
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(run.adapter)
    ).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(merged)
    code, by_adapter, _ = _step("eval", cfg)
    assert code == EXIT_OK
    code, by_merged, _ = _step(
        "eval", cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"model": str(merged)})})
    )
    assert code == EXIT_OK
    assert "base" not in by_merged.summary
    assert by_merged.summary["tuned"]["loss"] == pytest.approx(by_adapter.summary["tuned"]["loss"], rel=1e-4)
    assert json.loads((run.eval / "metrics.json").read_text())["target"]["kind"] == "model"


def test_no_adapter_is_a_clear_error(tmp_path, tiny_llama):
    code, _, mem = _step("eval", _cfg(tmp_path, tiny_llama))
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "no trained adapter" in err.message and "loratui train" in (err.hint or "")
    code, _, mem = _step("eval", _cfg(tmp_path, tiny_llama, f"eval.model={tmp_path}"))
    assert code == EXIT_USER and "neither a PEFT adapter" in mem.of_type("error")[0].message


def test_cancel_writes_nothing(tmp_path, tiny_llama):
    cfg = _cfg(tmp_path, tiny_llama)
    assert _step("train", cfg)[0] == EXIT_OK
    stop = StopFlag()
    writer = MemoryWriter()

    def stop_on_first_generation(event):
        writer(event)
        if getattr(event, "type", "") == "progress" and getattr(event, "task", "") == "base: generate":
            stop.set()

    code, _, _ = run_step("eval", load_step("eval"), cfg, writers=[stop_on_first_generation], stop=stop)
    assert code == EXIT_CANCELLED
    assert not RunDir.for_config(cfg).eval.exists()
    assert writer.of_type("cancelled")


def test_seq2seq_model_is_evaluated(tmp_path, tiny_model_factory):
    t5 = tiny_model_factory(family="t5")
    cfg = _cfg(tmp_path, t5, "eval.max_samples=4")
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    assert set(result.summary["tuned"]) == set(PLAIN_METRICS)
    gens = [json.loads(x) for x in (RunDir.for_config(cfg).eval / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all(isinstance(g["tuned"]["reply"], str) for g in gens)


def test_stop_ids_include_the_end_of_turn_token_when_it_differs_from_eos():
    from types import SimpleNamespace

    from loratui.pipeline.eval.examples import EvalSet, stop_ids
    from loratui.pipeline.eval.runtimes import Example

    tok = SimpleNamespace(eos_token_id=2, unk_token_id=0, all_special_ids=[0, 1, 2, 7])
    # a reply trained as "... <eot=7> <eos=2>"; 1 (bos) never inside a reply; 0 is unk
    rows = [
        Example(input_ids=[1, 5, 6, 9, 7, 2], labels=[-100, -100, -100, 9, 7, 2], prompt_ids=[1, 5, 6], reference="x")
    ]
    assert stop_ids(tok, [EvalSet("main", "s", "test", rows)]) == {2, 7}


def test_loss_plot_uses_the_run_that_produced_the_adapter(tmp_path):
    from loratui.pipeline.eval.plots import training_curves

    def metric(at, loss):
        return {"step": "train", "type": "metric", "at": at, "split": "train", "values": {"loss": loss}}

    events = [
        metric(1, 9.0),
        {"step": "train", "type": "done"},  # an older version
        metric(1, 5.0),
        metric(2, 4.0),
        {"step": "train", "type": "cancelled"},
        metric(2, 3.5),
        metric(3, 3.0),
        {"step": "eval", "type": "done"},  # resumed: step 2 again
        {"step": "train", "type": "done"},
        metric(1, 7.0),
        {"step": "train", "type": "error"},
    ]  # a later run that failed
    f = tmp_path / "events.jsonl"
    f.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    train, evals = training_curves(f)
    assert train == {1: 5.0, 2: 3.5, 3: 3.0} and evals == {}


def test_a_separate_test_file_is_named_as_the_source_of_the_test_split(tmp_path, tiny_llama):
    import shutil

    import loratui.data

    bundled = Path(loratui.data.__file__).parent / "quickstart"
    files = {}
    for split, name in (
        ("train", "facts-train.jsonl"),
        ("validation", "facts-val.jsonl"),
        ("test", "facts-test.jsonl"),
    ):
        files[split] = tmp_path / name
        shutil.copy(bundled / f"{split}.jsonl", files[split])
    cfg = _cfg(
        tmp_path,
        tiny_llama,
        f"data.source={files['train']}",
        f"data.val_source={files['validation']}",
        f"data.test_source={files['test']}",
        "train.max_steps=1",
        "eval.max_samples=4",
    )
    assert _step("train", cfg)[0] == EXIT_OK
    code, _, mem = _step("eval", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    run = RunDir.for_config(cfg)
    (main,) = json.loads((run.eval / "metrics.json").read_text())["datasets"]
    assert main["split"] == "test" and main["source"] == str(files["test"])
    head = (run.eval / "comparison.md").read_text().split("\n\n")[1]
    assert f"test split of `{files['test']}`" in head and "facts-train" not in head
    report = run.report.read_text()
    assert f"(`{files['test']}`, test split, 4 rows" in report
    assert f"validation `{files['validation']}`, test `{files['test']}`" in report

    # without a test file the validation split is scored, and named by its own file
    no_test = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_source": None, "test_ratio": 0.0})})
    code, _, mem = _step("eval", no_test)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    (main,) = json.loads((run.eval / "metrics.json").read_text())["datasets"]
    assert main["split"] == "validation" and main["source"] == str(files["validation"])


@pytest.mark.parametrize(
    ("probe", "device", "precision"),
    [
        ({"mps": True, "mps_built": True, "mps_bf16": True}, "mps", "bf16"),
        ({"mps": True, "mps_built": True}, "mps", "fp32"),
        ({"cuda": True, "cuda_name": "NVIDIA L4", "cuda_bf16": True, "mps": True}, "cuda", "bf16"),
        ({}, "cpu", "fp32"),
    ],
)
def test_evaluate_follows_the_training_device_choice(tmp_path, monkeypatch, probe, device, precision):
    """Only the probe is replaced: the device and precision evaluate would score on, and its log line."""
    from loratui.pipeline import device as devices
    from loratui.pipeline.eval import step

    class Chosen(Exception):
        pass

    def score(cfg, job, device, precision, events, should_stop):
        raise Chosen(device, precision)

    monkeypatch.setattr(devices, "probe", lambda: devices.Probe(**probe))
    monkeypatch.setattr(devices, "_fallback", {"logged": True})  # the MPS line is test_device's business
    monkeypatch.setattr(step, "_prepare", lambda *a: None)
    monkeypatch.setattr(step, "_score_models", score)
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=e"])
    mem = MemoryWriter()
    with pytest.raises(Chosen) as chosen:
        step.run(cfg, RunDir.for_config(cfg), EventSink("evaluate", [mem]), lambda: False)
    assert chosen.value.args == (device, precision)
    (line,) = [e.message for e in mem.of_type("log")]
    assert line.startswith(f"evaluating on {device} (auto: ") and line.endswith(f") in {precision}")
