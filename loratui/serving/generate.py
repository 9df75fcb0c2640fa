"""Offline batch generation (``loratui generate``): the server's backends without HTTP.

Input: JSONL rows with ``prompt`` (a text completion) or ``messages`` (a chat, the model's template
applied), optionally ``id`` (else the line number). Output: JSONL rows with ``id``, ``text``,
``finish_reason``, ``prompt_tokens`` and ``completion_tokens``, appended as they finish, so a run
that stops goes on where it stopped when started again (ids already in the output are skipped).
Bad rows go to ``<output>.errors.jsonl`` with line and reason. The PyTorch backend decodes up to
``serve.max_batch_size`` rows at once (continuous batching); llama.cpp and ONNX Runtime one at a time.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError
from loratui.serving.backends import Delta, GenRequest
from loratui.serving.score import done_ids, read_objects


@dataclass
class Settings:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def _rows(path: Path, skip: set[str], bad: Callable[[int, Any, str], None]) -> tuple[list[tuple[Any, int, Any]], int]:
    rows: list[tuple[Any, int, Any]] = []
    objects, already = read_objects(path, skip, bad)
    for line_no, row_id, data in objects:
        messages, prompt = data.get("messages"), data.get("prompt")
        if (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            rows.append((row_id, line_no, messages))
        elif isinstance(prompt, str) and prompt:
            rows.append((row_id, line_no, prompt))
        else:
            bad(
                line_no,
                row_id,
                "expected `prompt` (a non-empty string) or `messages` (a list of "
                "{role, content} objects with string values)",
            )
    return rows, already


def _prompt_ids(backend: Any, content: str | list[dict[str, str]]) -> tuple[list[int], str | None]:
    """The row's prompt as token ids, or why it cannot be generated (the ids are then empty)."""
    try:
        ids = backend.chat_prompt(content) if isinstance(content, list) else backend.encode(content)
    except Exception as e:  # a template that rejects the conversation, or no template
        return [], f"cannot build the prompt: {e}"
    if len(ids) + 1 > backend.context_length:
        return [], f"{len(ids)} prompt tokens: the model's context is {backend.context_length}"
    return ids, None


def _complete(backend: Any, row_id: Any, ids: list[int], settings: Settings) -> dict[str, Any]:
    """One row generated to its end: the output row."""
    req = GenRequest(
        ids,
        min(settings.max_tokens, backend.context_length - len(ids)),
        settings.temperature,
        settings.top_p,
        settings.stop,
        settings.seed,
    )
    text: list[str] = []
    last: Delta | None = None
    for delta in backend.stream(req):
        text.append(delta.text)
        last = delta
    return {
        "id": row_id,
        "text": "".join(text),
        "finish_reason": last.finish_reason if last else None,
        "prompt_tokens": len(ids),
        "completion_tokens": last.completion_tokens if last else 0,
    }


def generate_file(
    backend: Any,
    input_path: Path,
    output: Path,
    settings: Settings,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    if not input_path.is_file():
        raise LoratuiError(f"--input {input_path}: no such file")
    output.parent.mkdir(parents=True, exist_ok=True)
    errors = output.with_name(output.name + ".errors.jsonl")
    bad_rows: list[dict[str, Any]] = []
    rows, already = _rows(
        input_path, done_ids(output), lambda line, i, why: bad_rows.append({"line": line, "id": i, "error": why})
    )
    lock = threading.Lock()
    written, failed = [0], [0]
    stop_flag = threading.Event()

    def one(row: tuple[Any, int, Any]) -> None:
        row_id, line_no, content = row
        if stop_flag.is_set() or (should_stop and should_stop()):
            stop_flag.set()
            return
        ids, why = _prompt_ids(backend, content)
        if why is not None:
            with lock:
                bad_rows.append({"line": line_no, "id": row_id, "error": why})
                failed[0] += 1
            return
        result = _complete(backend, row_id, ids, settings)
        with lock, output.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
            out.flush()
            os.fsync(out.fileno())
            written[0] += 1
            if progress:
                progress(written[0], len(rows))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, rows))
    tmp = errors.with_name(f".{errors.name}.tmp")
    tmp.write_text("".join(json.dumps(b) + "\n" for b in bad_rows), encoding="utf-8")
    os.replace(tmp, errors)
    return {
        "generated": written[0],
        "skipped_done": already,
        "bad": len(bad_rows),
        "remaining": len(rows) - written[0] - failed[0],
        "cancelled": stop_flag.is_set(),
        "output": str(output),
        "errors": str(errors),
    }
