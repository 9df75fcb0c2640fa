"""Models loaded on demand beside the server's own: the fine-tuned models that jobs make.

``acquire(model)`` loads a model the first time it is asked for (once, however many requests ask at
the same time) and hands it out with a ``release`` to call when the request ends. At most ``size``
models stay loaded: past that, the least recently used one that no request is using is closed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    backend: Any = None
    users: int = 0
    loading: threading.Lock = field(default_factory=threading.Lock)


class ModelPool:
    def __init__(self, load: Callable[[str], Any], size: int = 2):
        self.load = load
        self.size = max(1, size)
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def loaded(self) -> list[str]:
        with self.lock:
            return [m for m, e in self.entries.items() if e.backend is not None]

    def loaded_backend(self, model: str) -> Any:
        """The backend of ``model`` if it is loaded now, else None (nothing is loaded or held)."""
        with self.lock:
            entry = self.entries.get(model)
            return entry.backend if entry is not None else None

    def acquire(self, model: str) -> tuple[Any, Callable[[], None]]:
        with self.lock:
            entry = self.entries.get(model)
            if entry is None:
                entry = self.entries[model] = _Entry()
            entry.users += 1
            self.entries.move_to_end(model)
        try:
            with entry.loading:
                if entry.backend is None:
                    entry.backend = self.load(model)
        except BaseException:
            self._release(model, entry)
            raise
        self._evict()
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._release(model, entry)

        return entry.backend, release

    def _release(self, model: str, entry: _Entry) -> None:
        with self.lock:
            entry.users -= 1
            if entry.backend is None and entry.users == 0 and self.entries.get(model) is entry:
                del self.entries[model]
        self._evict()

    def _evict(self) -> None:
        closing: list[Any] = []
        with self.lock:
            loaded = [(m, e) for m, e in self.entries.items() if e.backend is not None]
            for model, entry in loaded:  # oldest use first
                if len(loaded) - len(closing) <= self.size:
                    break
                if entry.users == 0:
                    del self.entries[model]
                    closing.append(entry.backend)
        for backend in closing:
            backend.close()

    def close(self) -> None:
        with self.lock:
            backends = [e.backend for e in self.entries.values() if e.backend is not None]
            self.entries.clear()
        for backend in backends:
            backend.close()
