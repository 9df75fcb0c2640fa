"""`loratui score`: batch log-likelihoods with onnxruntime, PyTorch or llama.cpp; resumable; bad rows aside."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loratui.serving.score import score_file

ROWS = [
    {"id": "a", "prompt": "Where is the library?", "completion": " At 14 Tannery Row."},
    {"id": "b", "prompt": "When does it open?", "completion": " Nine in the morning, every weekday but Monday."},
    {"id": "c", "prompt": "Hi", "completion": " Hello!"},
    {"id": "d", "prompt": "Is there parking for visitors near the building?", "completion": " Yes, 90 minutes free."},
    {"id": "e", "prompt": "Who runs it?", "completion": " The town of Ostervale."},
]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_model_factory):
    """The tiny model built into an ONNX folder by the exporter's own call (onnxruntime-genai's builder)."""
    from loratui.exporters.onnx import build

    model = tiny_model_factory()
    tmp = tmp_path_factory.mktemp("score")
    build(model, tmp / "onnx", "fp32", tmp / "onnx.log", lambda: False, False)
    return model, tmp / "onnx"


def _write(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def _read(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _reference(model_dir: Path, prompt: str, completion: str) -> tuple[list[float], int]:
    """Per-token log-likelihoods in plain transformers, and how many are the completion's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    head, tail = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[:, 0].tolist(), len(tail)


def test_onnx_scores_equal_pytorch_log_likelihoods(onnx_dir, tmp_path):
    model, onnx = onnx_dir
    out = tmp_path / "scores.jsonl"
    summary = score_file(onnx, _write(tmp_path / "in.jsonl", ROWS), out, "prompt+completion", batch_size=2)
    assert summary["scored"] == 5 and summary["bad"] == 0 and summary["backend"] == "onnx"
    got = _read(out)
    for row in ROWS:
        want, n_tail = _reference(model, row["prompt"], row["completion"])
        r = got[row["id"]]
        assert r["tokens"] == len(want) and r["completion_tokens"] == n_tail
        assert abs(r["log_likelihood"] - sum(want)) < 1e-4 * len(want)
        assert abs(r["completion_log_likelihood"] - sum(want[-n_tail:])) < 1e-4 * n_tail
        assert math.isclose(r["perplexity"], math.exp(-r["log_likelihood"] / r["tokens"]))
        assert math.isclose(r["mean_log_likelihood"], r["log_likelihood"] / r["tokens"])
    # the merged directory (PyTorch) gives the same figures, so users can compare runtimes
    score_file(model, tmp_path / "in.jsonl", tmp_path / "torch.jsonl", "prompt+completion", batch_size=3)
    torch_scores = _read(tmp_path / "torch.jsonl")
    for key, r in got.items():
        assert abs(torch_scores[key]["log_likelihood"] - r["log_likelihood"]) < 1e-4 * r["tokens"]


def test_an_interrupted_run_resumes_where_it_stopped(onnx_dir, tmp_path, monkeypatch):
    _, onnx = onnx_dir
    monkeypatch.setattr("loratui.serving.score.CHUNK_BATCHES", 1)  # append after every batch
    rows = [{"text": f"Row number {i} says {'word ' * (i % 7)}hello."} for i in range(12)]  # ids: line numbers
    src = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    calls = {"n": 0}

    def stop_after_two_batches() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    first = score_file(onnx, src, out, batch_size=4, should_stop=stop_after_two_batches)
    assert first["cancelled"] and first["scored"] == 8 and first["remaining"] == 4
    with out.open("a") as fh:
        fh.write('{"id": 99, "tokens": 3, "log_')  # a line half-written when the process was killed
    second = score_file(onnx, src, out, batch_size=4)
    assert second["skipped_done"] == 8 and second["scored"] == 4 and not second["cancelled"]
    lines = out.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == list(range(1, 13))  # each row once
    third = score_file(onnx, src, out, batch_size=4)
    assert third["scored"] == 0 and third["skipped_done"] == 12
    # a fresh, uninterrupted run gives the same numbers
    fresh = tmp_path / "fresh.jsonl"
    score_file(onnx, src, fresh, batch_size=5)
    a, b = _read(out), _read(fresh)
    assert all(abs(a[k]["log_likelihood"] - b[k]["log_likelihood"]) < 1e-4 for k in b)


def test_bad_rows_are_reported_and_skipped(onnx_dir, tmp_path):
    _, onnx = onnx_dir
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "text": "A good row of text."},
            {"id": 2, "text": ""},
            {"id": 3, "body": "no text field"},
            {"id": 1, "text": "repeated id"},
            {"id": 4, "text": "x" * 3000},
            {"id": 5, "text": 42},
        ],
        extra_lines=("not json at all", "[1, 2]", '{"id": 6, "text": "Another good row."}'),
    )
    out = tmp_path / "scores.jsonl"
    summary = score_file(onnx, src, out, batch_size=2)
    assert summary["scored"] == 2 and summary["bad"] == 7
    assert set(_read(out)) == {1, 6}
    errors = {e["line"]: e for e in map(json.loads, Path(summary["errors"]).read_text().splitlines())}
    assert "field 'text': expected a non-empty string, got str ''" in errors[2]["error"]
    assert "got missing" in errors[3]["error"]
    assert "appears earlier in the file" in errors[4]["error"]
    assert "longer than the model's context of" in errors[5]["error"] and errors[5]["id"] == 4
    assert "got int '42'" in errors[6]["error"]
    assert "not valid JSON" in errors[7]["error"] and "expected a JSON object" in errors[8]["error"]


def test_clear_errors_for_a_wrong_model_or_field(tmp_path, onnx_dir):
    from loratui.pipeline.errors import LoratuiError

    _, onnx = onnx_dir
    src = _write(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(LoratuiError, match="expected an ONNX export folder"):
        score_file(tmp_path, src, tmp_path / "o.jsonl")
    with pytest.raises(LoratuiError, match="expected one column"):
        score_file(onnx, src, tmp_path / "o.jsonl", "a+b+c")
    with pytest.raises(LoratuiError, match="no such file"):
        score_file(onnx, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")


def test_a_gguf_scores_like_the_model_it_came_from(tmp_path, tiny_model_factory):
    """llama.cpp (f32 GGUF) against PyTorch on the same rows: the same log-likelihoods, up to float sums."""
    import os
    import subprocess
    import sys

    from loratui.exporters.gguf import converter_dir

    model = tiny_model_factory(tokenizer="smollm2")
    gguf = tmp_path / "m.gguf"
    entry = (Path(__file__).parents[2] / "loratui" / "exporters" / "convert_entry.py").read_text()
    subprocess.run(
        [sys.executable, "-c", entry, str(model), "--outfile", str(gguf), "--outtype", "f32"],
        check=True,
        cwd=converter_dir(),
        env={**os.environ, "PYTHONPATH": str(converter_dir())},
        capture_output=True,
    )
    src = _write(tmp_path / "in.jsonl", ROWS)
    assert score_file(gguf, src, tmp_path / "g.jsonl", "prompt+completion")["backend"] == "gguf"
    score_file(model, src, tmp_path / "t.jsonl", "prompt+completion")
    g, t = _read(tmp_path / "g.jsonl"), _read(tmp_path / "t.jsonl")
    for key in t:
        assert g[key]["tokens"] == t[key]["tokens"] and g[key]["completion_tokens"] == t[key]["completion_tokens"]
        assert abs(g[key]["log_likelihood"] - t[key]["log_likelihood"]) < 1e-3 * t[key]["tokens"]


def test_the_command_line(onnx_dir, tmp_path, capsys):
    from loratui import cli

    _, onnx = onnx_dir
    src = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "scores.jsonl"
    assert (
        cli.main(
            [
                "score",
                "--model",
                str(onnx),
                "--input",
                str(src),
                "--output",
                str(out),
                "--field",
                "prompt+completion",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 5 and "scored 5 rows" in capsys.readouterr().err
    assert cli.main(["score", "--model", str(tmp_path / "nothing"), "--input", str(src), "--output", str(out)]) == 2
    assert "expected an ONNX export folder" in capsys.readouterr().err


def test_the_torch_scorer_follows_the_device_table(monkeypatch, tiny_model_factory):
    """Only MPS is probed: `loratui score` would load the model on mps (in fp32, as everywhere)."""
    from loratui.pipeline import device as devices
    from loratui.pipeline.eval import runtimes
    from loratui.serving.score import load_scorer

    class Loaded(Exception):
        pass

    def load_torch(model_dir, task, device, precision, trust_remote_code=False):
        raise Loaded(device, precision)

    monkeypatch.setattr(runtimes, "load_torch", load_torch)
    for probe, device in [(devices.Probe(mps=True, mps_built=True, mps_bf16=True), "mps"), (devices.Probe(), "cpu")]:
        monkeypatch.setattr(devices, "probe", lambda probe=probe: probe)
        with pytest.raises(Loaded) as loaded:
            load_scorer(tiny_model_factory(), batch_size=2)
        assert loaded.value.args == (device, "fp32")
