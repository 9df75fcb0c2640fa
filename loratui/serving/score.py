"""Batch scoring (``loratui score``): the log-likelihood of every row of a JSONL file under a model, for
ranking candidates, filtering data by perplexity or scoring test sets on CPU servers.

The model is an ONNX export (onnxruntime), a merged transformers directory (PyTorch) or a GGUF file
(llama.cpp), so one file can be scored by each and compared. Per row, in ``--output`` (JSONL):

* ``id`` (the row's ``id``, else its line number), ``tokens`` (tokens scored: all but the first),
  ``log_likelihood`` (natural log, summed), ``mean_log_likelihood`` and ``perplexity``;
* with ``--field prompt+completion``: the same for the whole text, plus ``completion_tokens``,
  ``completion_log_likelihood``, ``completion_mean_log_likelihood`` and ``completion_perplexity``:
  the completion given the prompt (prompt and completion tokenized apart and joined, the usual
  convention for scoring a continuation).

Rows are scored shortest first in batches (little padding) and appended as each chunk finishes, so an
interrupted run keeps its work: running the same command again skips the ids already in the output.
Bad rows (not JSON, a missing or empty field, too short, longer than the model's context, a repeated
id) go to ``<output>.errors.jsonl`` with the line and the reason; they never stop the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError

IGNORE = -100
CHUNK_BATCHES = 8  # batches per appended chunk: what an interruption can lose


@dataclass
class Row:
    id: Any
    line: int
    ids: list[int]
    completion: int = 0  # how many of the last tokens are the completion (0: no split)


@dataclass
class Scorer:
    """A loaded model: ``encode(text, first)`` to token ids and an EvalModel that scores them."""

    kind: str  # onnx, torch, gguf
    model: Any
    encode: Callable[[str, bool], list[int]]
    context: int | None
    close: Callable[[], None] = field(default=lambda: None)


def model_kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and any(path.glob("*.onnx")):
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "torch"
    raise LoratuiError(
        f"--model {path}: expected an ONNX export folder (*.onnx), a merged model directory "
        "(config.json + safetensors) or a .gguf file",
        hint="Export one with `loratui export --format onnx|gguf`, or point at runs/<name>/merged.",
    )


def load_scorer(path: Path, batch_size: int, threads: int | None = None) -> Scorer:
    from loratui.pipeline.eval.runtimes import LlamaCppModel, OnnxModel, TorchModel, load_onnx, load_torch

    kind = model_kind(path)
    if kind == "gguf":
        from loratui.exporters.gguf_info import summary

        n_ctx = min(int(summary(path)["context_length"] or 4096), 4096)
        llama = LlamaCppModel(path, name=path.name, stop_ids=set(), n_ctx=n_ctx, threads=threads)

        def encode_gguf(text: str, first: bool) -> list[int]:
            return llama.llm.tokenize(text.encode("utf-8"), add_bos=first, special=False)

        return Scorer(kind, llama, encode_gguf, n_ctx, llama.close)

    from transformers import AutoConfig, AutoTokenizer

    from loratui.pipeline.models import model_task

    if model_task(path) != "causal":
        raise LoratuiError(f"--model {path}: scoring is for decoder-only (causal) models; this one is encoder-decoder")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = AutoConfig.from_pretrained(str(path))
    context = getattr(config, "max_position_embeddings", None)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0)
    common: dict[str, Any] = {
        "name": path.name,
        "task": "causal",
        "pad_id": pad,
        "stop_ids": set(),
        "batch_size": batch_size,
        "token_budget": max(4096, batch_size * 256),
    }
    if kind == "onnx":
        model: Any = OnnxModel(load_onnx(path, threads=threads), **common)
    else:
        import torch

        from loratui.pipeline.device import pick

        device = pick("auto")  # the training table: CUDA, then Apple MPS, then the CPU
        if threads:
            torch.set_num_threads(threads)
        model = TorchModel(load_torch(path, "causal", device, "fp32"), **common)

    def encode_hf(text: str, first: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=first)["input_ids"])

    return Scorer(kind, model, encode_hf, context)


def parse_field(spec: str) -> tuple[str, str | None]:
    """``text`` -> ("text", None); ``prompt+completion`` -> ("prompt", "completion")."""
    parts = [p.strip() for p in spec.split("+")]
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise LoratuiError(f"--field {spec!r}: expected one column (text) or two joined by + (prompt+completion)")


def done_ids(output: Path) -> set[str]:
    """Ids already in the output (a half-written last line, from a killed run, is dropped)."""
    if not output.is_file():
        return set()
    seen, good = set(), []
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    for line in lines:
        try:
            seen.add(json.dumps(json.loads(line)["id"]))
            good.append(line)
        except (ValueError, KeyError, TypeError):
            break
    if len(good) < len(lines):  # keep only the complete lines before the break
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text("".join(good), encoding="utf-8")
        os.replace(tmp, output)
    return seen


def read_objects(
    path: Path, skip: set[str], bad: Callable[[int, Any, str], None]
) -> tuple[list[tuple[int, Any, dict]], int]:
    """The JSON objects of a JSONL file as (line, id, object), the id being the row's ``id`` or its line
    number; rows whose id is in ``skip`` are counted, not returned. Lines that are not JSON objects and
    repeated ids go to ``bad(line, id, reason)``."""
    rows: list[tuple[int, Any, dict]] = []
    seen: set[str] = set()
    already = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                bad(line_no, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(data, dict):
                bad(line_no, None, f"expected a JSON object, got {type(data).__name__}")
                continue
            row_id = data.get("id", line_no)
            key = json.dumps(row_id)
            if key in seen:
                bad(line_no, row_id, f"id {row_id!r} appears earlier in the file; ids must be unique")
                continue
            seen.add(key)
            if key in skip:
                already += 1
                continue
            rows.append((line_no, row_id, data))
    return rows, already


def read_rows(
    input_path: Path,
    columns: tuple[str, str | None],
    scorer: Scorer,
    skip: set[str],
    bad: Callable[[int, Any, str], None],
) -> tuple[list[Row], int]:
    """Rows still to score, and how many were already done."""
    first, second = columns
    rows: list[Row] = []
    objects, already = read_objects(input_path, skip, bad)
    for line_no, row_id, data in objects:
        texts = []
        for name in (first, second) if second else (first,):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                got = "missing" if name not in data else f"{type(value).__name__} {str(value)[:40]!r}"
                bad(line_no, row_id, f"field {name!r}: expected a non-empty string, got {got}")
                break
            texts.append(value)
        else:
            ids = scorer.encode(texts[0], True)
            completion = 0
            if second:
                tail = scorer.encode(texts[1], False)
                ids, completion = ids + tail, len(tail)
            if len(ids) < 2 or (completion and completion >= len(ids)):
                bad(line_no, row_id, f"{len(ids)} token(s): nothing to score (the first token has no context)")
            elif scorer.context and len(ids) > scorer.context:
                bad(line_no, row_id, f"{len(ids)} tokens, longer than the model's context of {scorer.context}")
            else:
                rows.append(Row(row_id, line_no, ids, completion))
    return rows, already


def _figures(logps: list[float], prefix: str = "") -> dict[str, Any]:
    total = float(sum(logps))
    n = len(logps)
    return {
        f"{prefix}tokens": n,
        f"{prefix}log_likelihood": total,
        f"{prefix}mean_log_likelihood": total / n,
        f"{prefix}perplexity": math.exp(-total / n),
    }


def result(row: Row, logps: list[float]) -> dict[str, Any]:
    out = {"id": row.id, **_figures(logps)}
    if row.completion:
        out.update(_figures(logps[-row.completion :], "completion_"))
    return out


def score_file(
    model_path: Path,
    input_path: Path,
    output: Path,
    field_spec: str = "text",
    batch_size: int = 16,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``input_path`` into ``output`` (appending); returns counts. ``progress(done, total)``."""
    from loratui.pipeline.eval.runtimes import Example, StopRequested

    if not input_path.is_file():
        raise LoratuiError(f"--input {input_path}: no such file")
    if batch_size < 1:
        raise LoratuiError(f"--batch-size {batch_size}: expected 1 or more")
    columns = parse_field(field_spec)
    scorer = load_scorer(model_path, batch_size, threads)
    errors = output.with_name(output.name + ".errors.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(output)
    bad_rows: list[dict[str, Any]] = []

    def bad(line: int, row_id: Any, reason: str) -> None:
        bad_rows.append({"line": line, "id": row_id, "error": reason})

    rows, already = read_rows(input_path, columns, scorer, skip, bad)
    tmp_errors = errors.with_name(f".{errors.name}.tmp")
    tmp_errors.write_text("".join(json.dumps(b) + "\n" for b in bad_rows), encoding="utf-8")
    os.replace(tmp_errors, errors)  # this run's bad rows (a re-run finds them again)
    if log:
        log(
            f"score: {len(rows)} rows to score with {scorer.kind} ({model_path}), {already} already in {output}, "
            f"{len(bad_rows)} bad rows in {errors}"
        )
    rows.sort(key=lambda r: len(r.ids))
    chunk = max(1, batch_size * CHUNK_BATCHES) if scorer.kind != "gguf" else 32
    scored = 0
    cancelled = False
    try:
        with output.open("a", encoding="utf-8") as out:
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                examples = [Example(input_ids=r.ids, labels=r.ids) for r in part]
                try:
                    logps = scorer.model.token_logprobs(examples, should_stop=should_stop)
                except StopRequested:
                    cancelled = True
                    break
                out.write("".join(json.dumps(result(r, lp)) + "\n" for r, lp in zip(part, logps)))
                out.flush()
                os.fsync(out.fileno())
                scored += len(part)
                if progress:
                    progress(scored, len(rows))
    finally:
        scorer.close()
    return {
        "scored": scored,
        "skipped_done": already,
        "bad": len(bad_rows),
        "remaining": len(rows) - scored,
        "cancelled": cancelled,
        "output": str(output),
        "errors": str(errors),
        "backend": scorer.kind,
    }
