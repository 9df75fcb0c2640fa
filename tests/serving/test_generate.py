"""`loratui generate`: offline batches of prompts and chats through the serving backends; resumable; bad rows aside."""

from __future__ import annotations

import json
from pathlib import Path

from loratui.serving.backends import LlamaCppBackend, TorchBackend
from loratui.serving.generate import Settings, generate_file
from tests.serving.test_app import CHAT, artifacts  # noqa: F401  (artifacts: a fixture)


def _write(path: Path, rows: list, extra: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra))
    return path


def test_prompts_and_chats_with_bad_rows_and_resume(artifacts, tmp_path):  # noqa: F811
    backend = TorchBackend(artifacts["torch"], "t", 256, max_batch_size=4)
    rows = [{"id": f"p{i}", "prompt": f"Prompt number {i} is"} for i in range(6)] + [
        {"id": "chat", "messages": CHAT},
        {"id": "empty", "prompt": ""},
        {"id": "p0", "prompt": "again"},
    ]
    src = _write(tmp_path / "in.jsonl", rows, extra=("{broken",))
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    try:
        first = generate_file(backend, src, out, Settings(max_tokens=6), workers=1, should_stop=stop_after_three)
        assert first["cancelled"] and first["generated"] == 3
        second = generate_file(backend, src, out, Settings(max_tokens=6), workers=4)
        assert second["skipped_done"] == 3 and second["generated"] == 4 and not second["cancelled"]
        got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert set(got) == {f"p{i}" for i in range(6)} | {"chat"}
        assert all(isinstance(r["text"], str) and r["completion_tokens"] <= 6 for r in got.values())
        assert got["chat"]["prompt_tokens"] == len(backend.chat_prompt(CHAT))
        errors = {e["line"]: e["error"] for e in map(json.loads, Path(second["errors"]).read_text().splitlines())}
        assert "expected `prompt`" in errors[8] and "appears earlier" in errors[9] and "not valid JSON" in errors[10]
        # greedy and batched: the same text as one at a time in llama.cpp on the same f32 weights
        gguf = LlamaCppBackend(artifacts["gguf"], "g", 256)
        try:
            single = generate_file(gguf, src, tmp_path / "g.jsonl", Settings(max_tokens=6))
            assert single["generated"] == 7
            by_gguf = {r["id"]: r["text"] for r in map(json.loads, (tmp_path / "g.jsonl").read_text().splitlines())}
        finally:
            gguf.close()
        assert by_gguf == {k: r["text"] for k, r in got.items()}
    finally:
        backend.close()
