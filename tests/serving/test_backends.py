"""Backends without the HTTP layer: text assembly, and PyTorch's continuous batching against one-at-a-time."""

from __future__ import annotations

import random
import threading
import time

import pytest

from loratui.serving.backends import GenRequest, TextAssembler, TorchBackend


def _decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_strings_split_across_tokens_are_never_streamed():
    pieces = {1: b"Hello ", 2: b"wor", 3: b"ld", 4: b"!", 5: b" END", 6: b"more"}
    text = TextAssembler(_decoder(pieces), ["world", " END"])
    out = [text.add(t) for t in (1, 2)]
    assert out == ["Hello", " "]  # the space might begin " END", then "wor" might begin "world": each held back
    assert text.add(3) == "" and text.stopped  # "world" found: cut, nothing after it
    assert text.flush() == ""
    free = TextAssembler(_decoder(pieces), [" END"])
    streamed = "".join(free.add(t) for t in (1, 2, 3, 4, 5))
    assert streamed == "Hello world!" and free.stopped


def test_multibyte_characters_are_emitted_whole():
    euro = "€".encode()  # three bytes, split over two tokens
    text = TextAssembler(_decoder({1: b"price ", 2: euro[:2], 3: euro[2:] + b"5"}), [])
    assert [text.add(t) for t in (1, 2, 3)] == ["price ", "", "€5"]
    assert text.flush() == ""


def test_continuous_batching_gives_each_request_its_own_output(tiny_model_factory):
    """Prompts of different lengths arriving at different times, seeded sampling: joining and leaving
    the running batch changes nothing in any reply."""
    backend = TorchBackend(tiny_model_factory(tokenizer="smollm2"), "t", 256, max_batch_size=4)
    assert backend.mergeable
    prompts = [("word " * random.Random(i).randint(1, 30)) + f"row {i}" for i in range(10)]

    def request(i: int) -> GenRequest:
        # some end at their first token (max_tokens 1), inside the batched prefill
        return GenRequest(
            backend.encode(prompts[i]), max_tokens=1 if i % 5 == 0 else 5 + 3 * (i % 4), temperature=1.0, seed=i
        )

    try:
        alone = {i: "".join(d.text for d in backend.stream(request(i))) for i in range(10)}
        together: dict[int, str] = {}

        def ask(i: int) -> None:
            time.sleep(0.01 * i)
            together[i] = "".join(d.text for d in backend.stream(request(i)))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
    finally:
        backend.close()
    assert together == alone and len(set(alone.values())) == 10


def test_prefix_caching_reuses_a_shared_prompt_start_and_changes_nothing(tiny_model_factory):
    backend = TorchBackend(tiny_model_factory(tokenizer="smollm2"), "t", 256, max_batch_size=4)
    chats = [[{"role": "user", "content": q}] for q in ("Where is it?", "When does it open?", "Who runs the place?")]
    hits: list[int] = []
    original = backend._cached_prefix

    def spy(prompts, adapter=None):
        shared, cache = original(prompts, adapter)
        hits.append(shared)
        return shared, cache

    backend._cached_prefix = spy
    try:

        def replies() -> list[str]:
            return [
                "".join(d.text for d in backend.stream(GenRequest(backend.chat_prompt(c), 8, temperature=0)))
                for c in chats
            ]

        backend.prefix_caching = False
        plain = replies()
        backend.prefix_caching, backend.prefix = True, None
        cached = replies()
    finally:
        backend.close()
    assert cached == plain and all(plain)
    # SmolLM2's template opens every chat with the same system prompt: the 2nd and 3rd prompts reuse it
    assert hits[-3] == 0 and hits[-2] >= 8 and hits[-1] >= 8


def test_prompts_prefilled_together_reuse_the_cached_prefix_and_change_nothing(tiny_model_factory):
    """Requests admitted together (the usual case under load) share the cached system prompt too."""
    import queue

    backend = TorchBackend(tiny_model_factory(tokenizer="smollm2"), "t", 256, max_batch_size=4)
    questions = ["Where is it?", "When does it open on Sundays?", "Who runs the place?", "Can I park there?"]
    prompts = [backend.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    seen: list[tuple[int, int]] = []
    original = backend._cached_prefix

    def spy(batch, adapter=None):
        shared, cache = original(batch, adapter)
        seen.append((len(batch), shared))
        return shared, cache

    def prefill() -> tuple[list[int], list[list[int]]]:
        """Four prompts admitted at once (the worker is idle): first tokens, and each row's mask."""
        _rows, _cache, mask, first = backend._prefill(
            [(GenRequest(list(p), 6, temperature=0), queue.Queue()) for p in prompts]
        )
        return first, mask.tolist()

    def replies() -> list[str]:
        out: dict[int, str] = {}

        def ask(i: int) -> None:
            out[i] = "".join(d.text for d in backend.stream(GenRequest(list(prompts[i]), 6, temperature=0)))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        return [out[i] for i in range(len(prompts))]

    backend._cached_prefix = spy
    try:
        alone = ["".join(d.text for d in backend.stream(GenRequest(list(p), 6, temperature=0))) for p in prompts]
        backend.prefix_caching, backend.prefix = False, None
        plain_first, _ = prefill()
        plain = replies()
        backend.prefix_caching = True
        "".join(d.text for d in backend.stream(GenRequest(list(prompts[0]), 2, temperature=0)))  # caches the prompt
        seen.clear()
        cached_first, mask = prefill()
        cached = replies()
    finally:
        backend.close()
    assert seen[0][0] == 4 and seen[0][1] >= 8, seen  # the shared system prompt came from the cache
    assert cached_first == plain_first and cached == plain == alone and all(alone)
    shared = seen[0][1]
    assert all(row[:shared] == [1] * shared for row in mask)  # [cached prefix][left-padded rest]


class _Loaded(Exception):
    """Raised in place of loading a model: the device and precision it would be loaded on."""


def _capture_load(monkeypatch, probe):
    from loratui.pipeline import device as devices
    from loratui.pipeline.eval import runtimes

    def load_torch(model_dir, task, device, precision, trust_remote_code=False):
        raise _Loaded(device, precision)

    monkeypatch.setattr(devices, "probe", lambda: probe)
    monkeypatch.setattr(runtimes, "load_torch", load_torch)


def test_the_torch_backend_follows_the_device_table(monkeypatch, tmp_path):
    """Only MPS is probed: the PyTorch backend loads on mps (bf16 from macOS 14), never on the CPU."""
    from loratui.pipeline.device import Probe

    for probe, expected in [
        (Probe(mps=True, mps_built=True, mps_bf16=True), ("mps", "bf16")),
        (Probe(mps=True, mps_built=True), ("mps", "fp32")),
        (Probe(cuda=True, cuda_name="NVIDIA L4", mps=True), ("cuda", "bf16")),
        (Probe(), ("cpu", "fp32")),
    ]:
        _capture_load(monkeypatch, probe)
        with pytest.raises(_Loaded) as loaded:
            TorchBackend(tmp_path, "m")
        assert loaded.value.args == expected
    with pytest.raises(_Loaded) as loaded:  # a device given by the caller wins
        TorchBackend(tmp_path, "m", device="cpu")
    assert loaded.value.args == ("cpu", "fp32")
