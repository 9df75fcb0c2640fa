"""OpenAI's response shapes."""

from __future__ import annotations

import pytest

from loratui.serving.errors import ApiError
from loratui.serving.finetune import page


def test_pages_follow_openai_cursors():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = page(items, None, 2)
    assert [i["id"] for i in first["data"]] == ["x0", "x1"] and first["has_more"] and first["last_id"] == "x1"
    last = page(items, "x3", 2)
    assert [i["id"] for i in last["data"]] == ["x4"] and not last["has_more"]
    with pytest.raises(ApiError, match="limit: 0 is out of range"):
        page(items, None, 0)
    with pytest.raises(ApiError, match="no item with id 'nope'"):
        page(items, "nope", 2)
