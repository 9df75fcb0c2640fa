"""The pool of fine-tuned models: loaded once on first use, the least recently used idle one unloaded."""

from __future__ import annotations

import threading
import time

import pytest

from loratui.serving.pool import ModelPool


class Fake:
    def __init__(self, name: str):
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_models_load_once_and_the_least_recently_used_idle_one_goes():
    loads: list[str] = []

    def load(model: str) -> Fake:
        loads.append(model)
        time.sleep(0.05)
        return Fake(model)

    pool = ModelPool(load, size=2)
    got: list[tuple[Fake, object]] = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and len({id(b) for b, _ in got}) == 1  # four requests at once: one load

    a = got[0][0]
    b, release_b = pool.acquire("b")
    release_b()
    c, release_c = pool.acquire("c")  # three loaded, two allowed: "a" is oldest but in use, so "b" goes
    assert b.closed and not a.closed and pool.loaded() == ["a", "c"]
    release_c()
    release_c()  # a second release is harmless
    for _, release in got:  # the four requests on "a" end
        release()
    _, release_d = pool.acquire("d")
    assert a.closed and not c.closed and pool.loaded() == ["c", "d"]
    release_d()
    pool.close()
    assert c.closed and pool.loaded() == []


def test_a_model_that_fails_to_load_is_not_kept():
    calls = []

    def load(model: str) -> Fake:
        calls.append(model)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return Fake(model)

    pool = ModelPool(load, size=1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pool.acquire("x")
    assert pool.entries == {}
    backend, release = pool.acquire("x")  # the next request tries again
    assert backend.name == "x" and calls == ["x", "x"]
    release()
