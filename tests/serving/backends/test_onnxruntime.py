"""The ONNX Runtime backend's continuous batching on a tiny ONNX export: requests decoded together give
each the reply it gets alone, and each keeps its own stops, length, sampling and cancel."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from loratui.serving.backends import Delta, GenRequest, OnnxBackend
from loratui.serving.backends.onnxruntime_batch import unsupported


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_factory) -> dict[str, Path]:
    """The tiny SmolLM2-tokenizer model exported by onnxruntime-genai's builder, fp32 and int4."""
    from loratui.exporters.onnx import build

    model = tiny_model_factory(tokenizer="smollm2")
    tmp = tmp_path_factory.mktemp("onnx-serve")
    out = {}
    for precision in ("fp32", "int4"):
        out[precision] = tmp / precision
        build(model, out[precision], precision, tmp / f"{precision}.log", lambda: False, False)
    return out


@pytest.fixture
def backend(exports):
    made: list[OnnxBackend] = []

    def make(precision: str = "fp32", max_batch_size: int = 4) -> OnnxBackend:
        made.append(OnnxBackend(exports[precision], "t", 256, max_batch_size=max_batch_size))
        assert made[-1].decoder is not None, made[-1].why_serial
        return made[-1]

    yield make
    for b in made:
        b.close()


def _steps(backend: OnnxBackend, each=None) -> list[int]:
    """The number of rows of every decode step from now on (``each(rows so far)`` runs before each step)."""
    rows: list[int] = []
    step = backend.decoder.step

    def spy(tokens):
        if each is not None:
            each(rows)
        rows.append(len(tokens))
        return step(tokens)

    backend.decoder.step = spy
    return rows


def _run(backend: OnnxBackend, req: GenRequest) -> tuple[str, Delta]:
    deltas = list(backend.stream(req))
    return "".join(d.text for d in deltas), deltas[-1]


def _reply(result: tuple[str, Delta]) -> tuple[str, str | None, int]:
    text, last = result
    return text, last.finish_reason, last.completion_tokens


def _together(backend: OnnxBackend, reqs: list[GenRequest], stagger: float = 0.005) -> list[tuple[str, Delta]]:
    out: list = [None] * len(reqs)

    def ask(i: int) -> None:
        time.sleep(stagger * i)
        out[i] = _run(backend, reqs[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert all(o is not None for o in out), "a request never finished"
    return out


PROMPTS = [("word " * random.Random(i).randint(1, 30)) + f"row {i}" for i in range(10)]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_concurrent_greedy_replies_equal_each_alone_and_onnxruntime_genai(backend, precision):
    """Ten prompts of different lengths, staggered, four rows at most: the others queue, join as rows
    leave, and every reply is the one it gets alone and from onnxruntime-genai's own loop."""
    b = backend(precision, max_batch_size=4)

    def request(i: int) -> GenRequest:  # some end at their first token (max_tokens 1)
        return GenRequest(b.encode(PROMPTS[i]), max_tokens=1 if i % 5 == 0 else 5 + 3 * (i % 4), temperature=0)

    alone = [_run(b, request(i)) for i in range(10)]
    genai = []
    for i in range(10):
        req = request(i)
        ids = list(b.model.tokens(req.prompt_ids, req.max_tokens))
        ids = ids[: next((k for k, t in enumerate(ids) if t in b.stop_ids), len(ids))]
        genai.append(b.decode(ids))
    rows = _steps(b, each=lambda seen: time.sleep(0.01))  # steps slow enough for the arrivals to queue
    together = _together(b, [request(i) for i in range(10)])
    assert [_reply(r) for r in together] == [_reply(r) for r in alone]
    assert [text for text, _ in together] == genai
    assert max(rows) == 4 and min(rows) >= 1  # the batch filled up to max_batch_size, never beyond
    assert b.decoder.rows == 0 and not b.decoder.buffers  # idle again: the KV cache released


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(backend):
    b = backend(max_batch_size=3)

    def request(i: int, seed: int) -> GenRequest:
        return GenRequest(b.encode(PROMPTS[i]), max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)

    alone = [_run(b, request(i, seed=i))[0] for i in range(6)]
    assert alone == [_run(b, request(i, seed=i))[0] for i in range(6)]
    assert [text for text, _ in _together(b, [request(i, seed=i) for i in range(6)])] == alone
    assert len(set(alone)) == 6
    assert _run(b, request(0, seed=1))[0] != alone[0]  # another seed, another draw


def test_a_cancelled_request_frees_its_row_while_the_others_go_on(backend):
    b = backend(max_batch_size=4)
    reqs = [GenRequest(b.encode(PROMPTS[i]), max_tokens=40, seed=i) for i in (1, 2, 3)]  # sampled: any mix-up shows
    alone = [_run(b, GenRequest(r.prompt_ids, r.max_tokens, seed=r.seed)) for r in reqs]
    # the client hangs up during the sixth step of all three rows (the HTTP layer sets the flag)
    rows = _steps(b, each=lambda seen: reqs[1].cancelled.set() if seen.count(3) == 5 else None)
    together = _together(b, reqs)
    assert together[1][1].finish_reason == "cancelled" and together[1][1].completion_tokens < 40
    assert [_reply(together[0]), _reply(together[2])] == [_reply(alone[0]), _reply(alone[2])]  # to their end
    first = rows.index(3)
    assert rows[first : first + 6] == [3] * 6 and set(rows[first + 6 :]) <= {1, 2} and rows[first + 6] == 2


def test_prefix_caching_reuses_a_shared_prompt_start_and_changes_nothing(backend):
    """SmolLM2's template opens every chat with the same system prompt: a prompt after the first reuses
    its KV cache and runs only the rest, with the same logits (sampled replies: any change shows)."""
    b = backend()
    chats = [[{"role": "user", "content": q}] for q in ("Where is it?", "When does it open?", "Who runs the place?")]
    hits: list[int] = []
    shared = b.decoder._shared
    b.decoder._shared = lambda prompt: hits.append(shared(prompt)) or hits[-1]

    def replies() -> list[tuple]:
        reqs = [GenRequest(b.chat_prompt(c), 12, seed=i) for i, c in enumerate(chats)]
        return [_reply(_run(b, r)) for r in reqs] + [_reply(r) for r in _together(b, reqs)]

    b.decoder.prefix_caching = False
    plain = replies()
    b.decoder.prefix_caching = True
    cached = replies()
    assert cached == plain and len({text for text, _, _ in plain}) == 3
    assert hits[:6] == [0] * 6 and hits[6] == 0 and min(hits[7:]) >= 8  # the first prompt has nothing to reuse


def test_stop_strings_and_max_tokens_per_row(backend):
    b = backend()
    full = [_run(b, GenRequest(b.encode(PROMPTS[i]), 10, temperature=0))[0] for i in range(3)]
    stop = full[1][3:5]
    cut = full[1][: full[1].index(stop)]
    out = _together(
        b,
        [
            GenRequest(b.encode(PROMPTS[0]), 10, temperature=0),
            GenRequest(b.encode(PROMPTS[1]), 10, temperature=0, stop=[stop]),
            GenRequest(b.encode(PROMPTS[2]), 3, temperature=0),
        ],
        stagger=0,
    )
    assert out[0][0] == full[0] and (out[0][1].finish_reason, out[0][1].completion_tokens) == ("length", 10)
    assert out[1][0] == cut and out[1][1].finish_reason == "stop" and out[1][1].completion_tokens < 10
    assert full[2].startswith(out[2][0]) and (out[2][1].finish_reason, out[2][1].completion_tokens) == ("length", 3)


def test_the_context_end_stops_a_row(backend):
    b = backend()
    prompt = b.encode(PROMPTS[3])
    text, last = _run(b, GenRequest(prompt, 1000, temperature=0))
    assert last.finish_reason == "length" and len(prompt) + last.completion_tokens == b.context_length == 256
    assert _run(b, GenRequest(prompt * 20, 5))[1].finish_reason == "length"  # no room at all


def test_close_ends_running_and_queued_requests(backend):
    """Two rows decoding, two more queued behind them: close() ends all four with an error (none hangs),
    and a request after close() gets its error at once."""
    b = backend(max_batch_size=2)
    _steps(b, each=lambda seen: time.sleep(0.01))  # slow steps: the requests are still running when close() comes
    reqs = [GenRequest(b.encode(PROMPTS[i]), 200, temperature=0) for i in range(4)]
    results: list = [None] * 4
    started = threading.Barrier(3)

    def ask(i: int) -> None:
        deltas = []
        for d in b.stream(reqs[i]):
            if not deltas and i < 2:
                started.wait(timeout=30)
            deltas.append(d)
        results[i] = deltas

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    started.wait(timeout=30)  # both rows have streamed a token
    b.close()
    [t.join(timeout=30) for t in threads]
    assert not b.worker.is_alive()
    assert all(r is not None for r in results), "a stream hung after close()"
    assert all(r[-1].finish_reason.startswith("error") for r in results)
    assert all(r[-1].completion_tokens < 200 for r in results[:2])
    assert [d.finish_reason for d in b.stream(GenRequest(reqs[0].prompt_ids, 5))] == [results[0][-1].finish_reason]


def test_graphs_it_cannot_batch_are_served_one_at_a_time(exports, monkeypatch):
    """A sliding-window, CUDA or non-GQA export goes through onnxruntime-genai's loop, one request at a
    time, and still answers concurrent requests."""
    config = {
        "model": {"decoder": {"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"}}},
        "search": {"past_present_share_buffer": True},
    }
    assert unsupported(config) is None
    assert "GroupQueryAttention" in unsupported({**config, "search": {}})
    window = {"model": {"decoder": {**config["model"]["decoder"], "sliding_window": {"window_size": 512}}}}
    assert "sliding-window" in unsupported({**config, **window})
    cuda = {"session_options": {"provider_options": [{"cuda": {}}]}}
    assert "cuda" in unsupported({**config, "model": {"decoder": {**config["model"]["decoder"], **cuda}}})

    import loratui.serving.backends.onnxruntime_batch as batch

    monkeypatch.setattr(batch, "unsupported", lambda config: "a test says so")
    serial = OnnxBackend(exports["fp32"], "t", 256)
    assert serial.decoder is None and serial.why_serial == "a test says so" and serial.max_batch_size == 1
    reqs = [GenRequest(serial.encode(PROMPTS[i]), 6, temperature=0) for i in range(3)]
    monkeypatch.undo()
    batched = OnnxBackend(exports["fp32"], "t", 256)
    try:
        expected = [_run(batched, GenRequest(r.prompt_ids, 6, temperature=0)) for r in reqs]
    finally:
        batched.close()
    assert [text for text, _ in _together(serial, reqs)] == [text for text, _ in expected]
