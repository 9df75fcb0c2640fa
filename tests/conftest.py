"""Shared fixtures. Everything is offline: tiny models are built here, never downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# No test may reach a model hub, whatever the machine allows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(family="llama", tokenizer="bpe", **sizes) -> Path``: built once per session per arguments."""
    from tests.tiny_models import make_tiny_model

    cache: dict[tuple, Path] = {}

    def factory(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), **kwargs)
        return cache[key]

    return factory


@pytest.fixture
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory(family="llama", tokenizer="bpe")
