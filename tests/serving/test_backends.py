"""Backends without the HTTP layer: text assembly, and PyTorch's continuous batching against one-at-a-time."""

from __future__ import annotations

import random
import threading
import time

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
        return GenRequest(backend.encode(prompts[i]), max_tokens=5 + 3 * (i % 4), temperature=1.0, seed=i)

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
