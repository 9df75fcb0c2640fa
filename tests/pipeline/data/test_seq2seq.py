"""Encoder-decoder (seq2seq) models: source -> input_ids, target -> labels, no chat template, no -100."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline import models
from loratui.pipeline.config import load_config
from loratui.pipeline.data import cache, summary, tokens
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data.encode import IGNORE, clean_backend, encode_seq2seq_batch, seq2seq_texts
from loratui.pipeline.data.loaders import bundled_split
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.steps import run_step

QA = [
    {"question": f"What is the fee for plan {i}?", "answer": f"Plan {i} costs {10 + i} EUR a year."} for i in range(30)
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Fee?"},
    {"role": "assistant", "content": "EUR 45 a year."},
    {"role": "user", "content": "E-mail?"},
    {"role": "assistant", "content": "members@example.org"},
]


@pytest.fixture
def t5(tiny_model_factory) -> Path:
    return tiny_model_factory(family="t5", tokenizer="bpe")


@pytest.fixture
def env(tmp_path, monkeypatch, t5):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    return {"tmp": tmp_path, "model": t5}


def _step(env, name="r", model=None, **overrides):
    args = [f"runs_dir={env['tmp'] / 'runs'}", f"name={name}", f"model.base={model or env['model']}"]
    args += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    cfg = load_config(None, args)
    mem = MemoryWriter()
    code, result, _ = run_step("data", data_step.run, cfg, writers=[mem])
    return code, result, mem, env["tmp"] / "runs" / name / "data"


def _run(env, name="r", **overrides):
    code, result, mem, data = _step(env, name, **overrides)
    errors = mem.of_type("error")
    assert code == 0, errors[0].message if errors else code
    return result, json.loads((data / "report.json").read_text()), data, mem


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(data: Path, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(data / "processed" / split))


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def test_task_comes_from_the_model_config(t5, tiny_llama, tmp_path):
    assert models.model_task(t5) == "seq2seq"
    assert models.model_task(tiny_llama) == "causal"
    # T5's config class implies is_encoder_decoder even when config.json leaves it out
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((t5 / "config.json").read_text())
    config.pop("is_encoder_decoder", None)
    (bare / "config.json").write_text(json.dumps(config))
    assert models.model_task(bare) == "seq2seq"
    # an architecture transformers does not know: the raw flag decides
    (bare / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "is_encoder_decoder": True}))
    assert models.model_task(bare) == "seq2seq"


def test_the_tiny_t5_has_no_chat_template_and_none_is_needed(t5):
    from loratui.pipeline.events import null_sink

    assert _tok(t5).chat_template is None
    cfg = load_config(None, [f"model.base={t5}"])
    loaded = models.load_model_inputs(cfg, null_sink("data"))
    assert loaded.task == "seq2seq" and loaded.template is None


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def test_source_and_target_texts():
    single = [{"role": "user", "content": "When do you open?"}, {"role": "assistant", "content": "At 08:30."}]
    assert seq2seq_texts(single) == ("When do you open?", "At 08:30.")
    with_system = [{"role": "system", "content": "Be brief."}, *single]
    assert seq2seq_texts(with_system) == ("Be brief.\n\nWhen do you open?", "At 08:30.")
    assert seq2seq_texts(MULTI) == (
        "system: Be brief.\nuser: Fee?\nassistant: EUR 45 a year.\nuser: E-mail?",
        "members@example.org",
    )


def _batch(rows: list[list[dict[str, str]]]) -> dict[str, list]:
    return {
        "messages": [json.dumps(r) for r in rows],
        "text": [""] * len(rows),
        "document": [False] * len(rows),
        "source": [f"f.jsonl:{i + 1}" for i in range(len(rows))],
        "meta": [""] * len(rows),
    }


def test_encoding_a_multi_turn_chat(t5):
    tok = _tok(t5)
    out = encode_seq2seq_batch(_batch([MULTI]), clean_backend(tok), tok.eos_token_id).to_pydict()
    source, target = seq2seq_texts(MULTI)
    assert out["input_ids"] == [_ids(tok, source)]
    assert out["labels"] == [_ids(tok, target) + [tok.eos_token_id]]
    assert out["chunk"] == [0] and out["source"] == ["f.jsonl:1"]
    assert tok.decode(out["labels"][0]) == "members@example.org</s>"


def test_a_tokenizer_that_appends_eos_itself_gets_no_second_eos(t5):
    """Real T5/PEGASUS tokenizers end every encoding with </s>: the source keeps it, the target has it once."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(_tok(t5))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)]
    )
    rows = [[{"role": "user", "content": "Fee?"}, {"role": "assistant", "content": "EUR 45."}], MULTI]
    out = encode_seq2seq_batch(_batch(rows), clean_backend(tok), tok.eos_token_id).to_pydict()
    eos = tok.eos_token_id
    assert out["input_ids"][0] == _ids(tok, "Fee?") + [eos]
    assert out["labels"] == [_ids(tok, "EUR 45.") + [eos], _ids(tok, "members@example.org") + [eos]]


def test_a_text_row_is_refused_with_its_file_and_row(t5):
    tok = _tok(t5)
    batch = _batch([MULTI])
    batch["messages"], batch["text"] = [""], ["plain text"]
    with pytest.raises(LoratuiError, match=r"f.jsonl, row 1: a text example cannot train an encoder-decoder"):
        encode_seq2seq_batch(batch, clean_backend(tok), tok.eos_token_id)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def test_quickstart_through_a_tiny_t5(env):
    result, report, data, _ = _run(env, data__source="quickstart")
    tok = _tok(env["model"])
    rows = [json.loads(line) for line in bundled_split("quickstart", "train").read_text().splitlines()]
    train = _load(data, "train")
    assert len(train) == len(rows) == report["splits"]["train"]
    for i in (0, 1, len(rows) - 1):
        assert train[i]["source"].endswith(f"train.jsonl:{i + 1}")
        assert train[i]["input_ids"] == _ids(tok, rows[i]["question"])
        assert train[i]["labels"] == _ids(tok, rows[i]["answer"]) + [tok.eos_token_id]
    assert all(IGNORE not in labels for labels in train["labels"]), "every target token is trained"
    assert report["task"] == "seq2seq" and report["template"] is None and report["rows"]["truncated"] == 0
    assert result.summary["task"] == "seq2seq"
    longest = max(report["tokens"]["train"]["max"], report["tokens"]["target"]["train"]["max"])
    assert report["max_length"] == -(-longest // 64) * 64, "auto fits the longest source or target"
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["task"] == "seq2seq" and manifest["chat_template"] is None
    assert manifest["max_length"] == report["max_length"]


def test_the_data_trains_the_tiny_t5(env):
    """The rows are what T5ForConditionalGeneration takes: input_ids in, labels out, a finite loss."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    _, _, data, _ = _run(env, data__source="quickstart")
    row = _load(data, "train")[0]
    model = AutoModelForSeq2SeqLM.from_pretrained(str(env["model"]))
    loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert torch.isfinite(loss)


def test_chat_files_become_source_and_target(env):
    rows = [
        {
            "messages": [
                *MULTI[1:3],
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(20)
    ]
    src = _write_jsonl(env["tmp"] / "chat.jsonl", rows)
    _, _, data, _ = _run(env, data__source=src, data__system_prompt="Be brief.", data__val_ratio=0, data__test_ratio=0)
    tok = _tok(env["model"])
    first = _load(data, "train")[0]
    source = "system: Be brief.\nuser: Fee?\nassistant: EUR 45 a year.\nuser: Question 0?"
    assert first["input_ids"] == _ids(tok, source)
    assert first["labels"] == _ids(tok, "Answer 0.") + [tok.eos_token_id]


@pytest.mark.parametrize("as_folder", [False, True])
def test_text_data_is_refused_naming_the_file(env, as_folder):
    if as_folder:
        docs = env["tmp"] / "docs"
        docs.mkdir()
        (docs / "handbook.md").write_text("# Handbook\n\nOpening hours are 9 to 5.")
        src, name, what = docs, "handbook.md", "is a document"
    else:
        src = _write_jsonl(env["tmp"] / "notes.jsonl", [{"text": f"Note {i}."} for i in range(10)])
        name, what = "notes.jsonl", "holds plain text rows"
    code, _, mem, _ = _step(env, data__source=src)
    error = mem.of_type("error")[0]
    assert code == 2
    assert name in error.message and what in error.message
    assert "encoder-decoder (seq2seq)" in error.message and "source" in error.message and "target" in error.message
    assert "question/answer" in error.hint


def test_text_format_set_explicitly_is_refused_too(env):
    src = _write_jsonl(env["tmp"] / "qa.jsonl", [{"text": "x", "question": "q", "answer": "a"}])
    code, _, mem, _ = _step(env, data__source=src, data__format="text")
    assert code == 2 and "qa.jsonl: holds plain text rows (set by data.format)" in mem.of_type("error")[0].message


def _long_rows():
    rows = QA[:20]
    rows[3] = {"question": "Tell me everything: " + " ".join(f"item {j}," for j in range(40)), "answer": "No."}
    rows[5] = {"question": "Long answer?", "answer": " ".join(f"Point {j}." for j in range(40))}
    return rows


def test_over_long_source_and_target_are_truncated_each(env):
    src = _write_jsonl(env["tmp"] / "long.jsonl", _long_rows())
    _, report, data, _ = _run(env, data__source=src, data__max_length=24, data__val_ratio=0, data__test_ratio=0)
    train = _load(data, "train")
    assert max(len(x) for x in train["input_ids"]) == 24 and max(len(x) for x in train["labels"]) == 24
    truncated = {t["row"]: t["message"] for t in report["truncated"]}
    assert set(truncated) == {4, 6} and report["tokens"]["over_max_length"] == 2
    assert truncated[4].startswith("source ") and "target" not in truncated[4]
    assert truncated[6].startswith("target ") and truncated[6].endswith("more than max_length 24: truncated to 24")
    assert len(train) == 20


def test_over_long_rows_are_dropped_under_drop(env):
    src = _write_jsonl(env["tmp"] / "long.jsonl", _long_rows())
    _, report, data, _ = _run(
        env,
        data__source=src,
        data__max_length=24,
        data__on_problem="{too_long: drop}",
        data__val_ratio=0,
        data__test_ratio=0,
    )
    assert sorted((d["row"], d["kind"]) for d in report["dropped"]) == [(4, "too_long"), (6, "too_long")]
    assert len(_load(data, "train")) == 18 and report["rows"]["truncated"] == 0


def test_train_on_prompt_is_ignored_with_a_warning(env):
    src = _write_jsonl(env["tmp"] / "qa.jsonl", QA)
    _, _, data, mem = _run(env, data__source=src, data__train_on_prompt="true")
    warnings = [e.message for e in mem.of_type("log") if e.level == "warning"]
    assert any("train_on_prompt is ignored" in w for w in warnings)
    tok = _tok(env["model"])
    first = _load(data, "train")[0]
    assert tok.decode(first["labels"]).startswith("Plan ") and IGNORE not in first["labels"]


def test_preview_shows_source_and_target(env, capsys):
    src = _write_jsonl(env["tmp"] / "qa.jsonl", QA)
    _, _, data, _ = _run(env, data__source=src)
    preview = (data / "preview.txt").read_text()
    assert preview.count("── example") == 3 and "seq2seq" in preview
    assert "source: What is the fee for plan" in preview and "target: ⟦Plan " in preview
    assert "EUR a year.</s>⟧" in preview
    assert "source tokens min" in preview and "target tokens min" in preview and "tokens per epoch" in preview
    cfg = load_config(
        None, [f"runs_dir={env['tmp'] / 'runs'}", "name=r", f"model.base={env['model']}", f"data.source={src}"]
    )
    summary.show_preview(cfg, n=2)
    out = capsys.readouterr().out
    assert out.count("── example") == 2 and "source: What is the fee" in out and "target: Plan " in out


def test_cache_is_per_task_and_causal_keys_are_unchanged(env, tiny_llama):
    src = _write_jsonl(env["tmp"] / "qa.jsonl", QA)
    cfg = load_config(None, [f"data.source={src}"])
    files = {"train": [src], "validation": [], "test": []}
    causal = cache.cache_key(cfg, files, tiny_llama, "template")
    assert cache.cache_key(cfg, files, tiny_llama, "template", "causal") == causal
    assert cache.cache_key(cfg, files, tiny_llama, "template", "seq2seq") != causal
    first, _, _, _ = _run(env, data__source=src)
    second, _, data, _ = _run(env, name="again", data__source=src)
    assert (first.summary["cache_hit"], second.summary["cache_hit"]) == (False, True)
    assert json.loads((data / "dataset.json").read_text())["task"] == "seq2seq"


def test_a_causal_manifest_says_causal(env, tiny_llama):
    src = _write_jsonl(env["tmp"] / "qa.jsonl", QA)
    result, report, data, _ = _run(env, data__source=src, model__base=tiny_llama)
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["task"] == "causal" and manifest["template"] == "tokenizer" and manifest["chat_template"]
    assert report["task"] == "causal" and result.summary["task"] == "causal"
    assert any(label == IGNORE for label in _load(data, "train")[0]["labels"]), "the prompt is still masked"


def test_worker_processes_give_the_same_seq2seq_tokens(env):
    from loratui.pipeline.data.formats import to_example
    from loratui.pipeline.events import null_sink

    cfg = load_config(None, [f"model.base={env['model']}"])
    loaded = models.load_model_inputs(cfg, null_sink("data"))
    examples = [to_example(r, "qa", "f", i, None) for i, r in enumerate(QA)]
    args = (examples, loaded.tokenizer, None, cfg, null_sink("data"), lambda: False, "train")
    one = tokens.encode_examples(*args, num_proc=1, task="seq2seq")
    two = tokens.encode_examples(*args, num_proc=2, task="seq2seq")
    assert one["input_ids"][:] == two["input_ids"][:] and one["labels"][:] == two["labels"][:]
