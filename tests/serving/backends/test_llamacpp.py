"""The llama.cpp backend's continuous batching, on the embedded SmolLM2-135M GGUF (a real model: its
greedy choices are close enough that a batch changing any logit shows in the text)."""

from __future__ import annotations

import threading
import time

import pytest

from loratui.pipeline import models
from loratui.serving.backends import Delta, GenRequest, LlamaCppBackend

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "Where is the library?",
    "What is 2+2?",
    "Tell me a joke.",
    "Name three colors.",
    "Who wrote Hamlet?",
    "What is the capital of France?",
    "Explain gravity briefly.",
    "Say hello in Spanish.",
]


@pytest.fixture(scope="module")
def gguf():
    return models.builtin_gguf(models.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def backend(gguf):
    b = LlamaCppBackend(gguf, "t", 512, threads=1, max_batch_size=4)
    yield b
    b.close()


def prompt(backend: LlamaCppBackend, i: int) -> list[int]:
    return backend.chat_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])


def collect(backend: LlamaCppBackend, req: GenRequest) -> tuple[str, Delta]:
    deltas = list(backend.stream(req))
    return "".join(d.text for d in deltas), deltas[-1]


def together(backend: LlamaCppBackend, reqs: list[GenRequest], stagger: float = 0.0) -> list[tuple[str, Delta]]:
    """Every request on its own thread at once (``stagger`` seconds apart): their texts and last deltas."""
    out: list[tuple[str, Delta] | None] = [None] * len(reqs)

    def ask(i: int) -> None:
        time.sleep(stagger * i)
        out[i] = collect(backend, reqs[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert all(o is not None for o in out), "a request did not end"
    return out  # type: ignore[return-value]


def settled(backend: LlamaCppBackend) -> bool:
    """Whether the worker has let every row go (it frees a slot just after the row's last delta)."""
    deadline = time.monotonic() + 10
    while backend.batcher.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    return not backend.batcher.rows and sorted(backend.batcher.free_seqs) == list(range(backend.max_batch_size))


def test_concurrent_greedy_requests_get_the_text_each_gets_alone(backend, gguf):
    """8 greedy requests on 4 slots (joining and leaving between steps) give exactly the texts they give
    one at a time, and those are what llama-cpp-python's high-level ``Llama.generate`` gives."""
    import llama_cpp

    reqs = [GenRequest(prompt(backend, i), 20, temperature=0) for i in range(8)]
    alone = [collect(backend, GenRequest(r.prompt_ids, r.max_tokens, temperature=0))[0] for r in reqs]
    backend.batcher.profile = []
    try:
        batched = together(backend, reqs, stagger=0.02)
    finally:
        calls, backend.batcher.profile = backend.batcher.profile, None
    assert max(rows for rows, _tokens, _s in calls if _tokens == rows) == 4  # decode steps did run 4 rows
    assert [text for text, _ in batched] == alone
    assert len(set(alone)) == 8 and all(alone)

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        for req, text in zip(reqs, alone):
            ids: list[int] = []
            for token in llm.generate(req.prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if token in backend.stop_ids or len(ids) == req.max_tokens:
                    break
                ids.append(token)
            assert backend.decode(ids).rstrip("\ufffd") == text  # the backend holds back half a character
    finally:
        llm.close()


def test_a_cancelled_request_frees_its_slot_and_kv_cells_while_the_others_go_on(backend):
    import llama_cpp

    long = GenRequest(prompt(backend, 0), 60, temperature=0)
    victim = GenRequest(prompt(backend, 1), 400, temperature=0)
    expected = collect(backend, GenRequest(long.prompt_ids, 60, temperature=0))[0]
    seen: list[Delta] = []
    ended = threading.Event()

    def watch() -> None:
        for d in backend.stream(victim):
            seen.append(d)
            if len(seen) == 3:
                victim.cancelled.set()
        ended.set()

    threading.Thread(target=watch).start()
    while not seen:
        time.sleep(0.01)
    text, last = collect(backend, long)  # starts while the victim runs, finishes after it left
    assert ended.wait(30) and seen[-1].finish_reason == "cancelled"
    assert 3 <= seen[-1].completion_tokens < 400
    assert text == expected and last.finish_reason == "length" and last.completion_tokens == 60
    assert settled(backend)
    memory, cached = backend.batcher.memory, backend.batcher.cached
    slot = next(s for s, ids in cached.items() if ids == victim.prompt_ids)
    # its generated tokens' cells are gone; its prompt's stay as the slot's prompt cache
    assert llama_cpp.llama_memory_seq_pos_max(memory, slot) == len(victim.prompt_ids) - 1
    assert all(llama_cpp.llama_memory_seq_pos_max(memory, s) == len(ids) - 1 for s, ids in cached.items())


def test_a_slot_keeps_its_prompt_and_the_next_request_prefills_only_what_differs(gguf):
    b = LlamaCppBackend(gguf, "t", 512, threads=1, max_batch_size=2)
    try:
        first, second = prompt(b, 0), prompt(b, 1)
        shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
        assert shared > 10  # the chat template's system prompt
        b.batcher.profile = []
        fresh = collect(b, GenRequest(second, 12, temperature=0))[0]
        collect(b, GenRequest(first, 12, temperature=0))  # slot 0 now keeps `first`
        again = collect(b, GenRequest(second, 12, temperature=0))[0]
        prefills = [tokens for rows, tokens, _s in b.batcher.profile if rows == 1 and tokens > 1]
        assert prefills == [len(second), len(first) - shared, len(second) - shared]
        assert again == fresh
        # the same prompt again: all but its last two tokens come from the cache
        b.batcher.profile = []
        assert collect(b, GenRequest(second, 12, temperature=0))[0] == fresh
        assert [tokens for rows, tokens, _s in b.batcher.profile if tokens > 1] == [2]
    finally:
        b.close()


def test_stop_strings_and_max_tokens_hold_per_row(backend):
    base = [collect(backend, GenRequest(prompt(backend, i), 24, temperature=0))[0] for i in range(3)]
    words = base[0].split()
    stop = " ".join(words[2:4])  # in the middle of the first reply
    reqs = [
        GenRequest(prompt(backend, 0), 24, temperature=0, stop=[stop]),
        GenRequest(prompt(backend, 1), 5, temperature=0),
        GenRequest(prompt(backend, 2), 1, temperature=0),
        GenRequest(prompt(backend, 3), 24, temperature=0, stop=["\u2603 never"]),
    ]
    (t0, d0), (t1, d1), (t2, d2), (_t3, d3) = together(backend, reqs)
    assert t0 == base[0][: base[0].index(stop)] and d0.finish_reason == "stop"
    assert d1.completion_tokens == 5 and d1.finish_reason == "length" and base[1].startswith(t1)
    assert d2.completion_tokens == 1 and d2.finish_reason == "length" and base[2].startswith(t2)
    assert d3.finish_reason in ("stop", "length") and d3.prompt_tokens == len(prompt(backend, 3))


def test_more_requests_than_slots_queue_and_all_finish(backend):
    reqs = [GenRequest(prompt(backend, i), 6 + i, temperature=0) for i in range(10)]
    backend.batcher.profile = []
    try:
        out = together(backend, reqs)
    finally:
        calls, backend.batcher.profile = backend.batcher.profile, None
    assert all(rows <= 4 for rows, _tokens, _s in calls)
    for (text, last), req in zip(out, reqs):
        assert last.finish_reason in ("stop", "length") and text
        assert last.finish_reason == "stop" or last.completion_tokens == req.max_tokens
    assert settled(backend)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(backend):
    def sampled(seed: int) -> GenRequest:
        return GenRequest(prompt(backend, 2), 20, temperature=1.0, top_p=0.95, seed=seed)

    first = collect(backend, sampled(7))[0]
    batch = together(backend, [sampled(7), sampled(8), sampled(9), GenRequest(prompt(backend, 4), 20, temperature=0)])
    assert batch[0][0] == first
    assert len({first, batch[1][0], batch[2][0]}) > 1  # the seed matters


def test_the_context_end_finishes_a_row_with_length(gguf):
    b = LlamaCppBackend(gguf, "t", 48, threads=1, max_batch_size=2)
    try:
        reqs = [GenRequest(b.chat_prompt([{"role": "user", "content": q}]), 100, temperature=0) for q in QUESTIONS[:3]]
        for req, (_text, last) in zip(reqs, together(b, reqs)):
            assert last.finish_reason == "length" or last.finish_reason == "stop"
            if last.finish_reason == "length":
                assert len(req.prompt_ids) + last.completion_tokens == 48
    finally:
        b.close()


def test_a_failed_decode_ends_its_rows_with_an_error_and_the_next_requests_are_served(backend, monkeypatch):
    import llama_cpp

    expected = collect(backend, GenRequest(prompt(backend, 5), 8, temperature=0))[0]
    real = llama_cpp.llama_decode
    calls = []

    def failing(ctx, batch):
        calls.append(batch.n_tokens)
        return 1 if len(calls) == 1 else real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", failing)
    text, last = collect(backend, GenRequest(prompt(backend, 5), 8, temperature=0))
    assert (text, last.finish_reason) == ("", "error: llama_decode returned 1")
    assert collect(backend, GenRequest(prompt(backend, 5), 8, temperature=0))[0] == expected
    assert settled(backend)


def test_close_ends_the_requests_in_flight_and_frees_the_context(gguf):
    b = LlamaCppBackend(gguf, "t", 512, threads=1, max_batch_size=2)
    reqs = [GenRequest(b.chat_prompt([{"role": "user", "content": q}]), 400, temperature=0) for q in QUESTIONS[:4]]
    lasts: list[Delta] = []
    started = threading.Event()

    def ask(req: GenRequest) -> None:
        deltas = []
        for d in b.stream(req):
            deltas.append(d)
            started.set()
        lasts.append(deltas[-1])

    threads = [threading.Thread(target=ask, args=(r,)) for r in reqs]  # two run, two wait in the queue
    [t.start() for t in threads]
    assert started.wait(30)
    b.close()
    [t.join(timeout=30) for t in threads]
    assert len(lasts) == 4 and all(d.finish_reason == "cancelled" for d in lasts)
    assert b.batcher.ctx is None and not b.worker.is_alive()
    late = list(b.stream(GenRequest(reqs[0].prompt_ids, 4, temperature=0)))
    assert len(late) == 1 and late[0].finish_reason.startswith("error") and "closed" in late[0].finish_reason
    b.close()  # twice: nothing happens


def test_serve_builds_it_with_the_configured_batch_size(gguf):
    from loratui.serving.selection import Choice
    from loratui.serving.server import ServeOptions, build_backend

    b = build_backend(
        Choice("gguf", gguf, None, "test"), ServeOptions(target=gguf, max_batch_size=3, context_length=256), "t"
    )
    try:
        assert isinstance(b, LlamaCppBackend) and b.max_batch_size == 3 and b.context_length == 256
        assert b.batcher.slots == 3
    finally:
        b.close()
