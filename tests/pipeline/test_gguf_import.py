"""The GGUF tokenizer rebuild, on the embedded GGUF's metadata (no weights are loaded)."""

from __future__ import annotations

import pytest

from loratui.pipeline import models
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.gguf_import import build_bpe_tokenizer, build_tokenizer, read_gguf_metadata


@pytest.fixture(scope="module")
def meta():
    return read_gguf_metadata(models.builtin_gguf(models.DEFAULT_MODEL))


def test_metadata_is_smollm2(meta):
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.add_bos_token"] is False


def test_bos_and_eos_only_when_the_gguf_asks(meta):
    plain = build_bpe_tokenizer(meta)
    both = build_bpe_tokenizer({**meta, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    ids = plain.encode("hi 12")
    assert ids[0] != plain.bos_token_id and ids[-1] != plain.eos_token_id
    assert both.encode("hi 12") == [plain.bos_token_id, *ids, plain.eos_token_id]


def test_control_tokens_are_special_and_skipped_on_decode(meta):
    tok = build_bpe_tokenizer(meta)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_unknown_pre_tokenizer_is_a_clear_error(meta):
    with pytest.raises(LoratuiError, match="pre-tokenizer 'mystery' is not supported") as exc:
        build_bpe_tokenizer({**meta, "tokenizer.ggml.pre": "mystery"}, source="m.gguf")
    assert "smollm" in exc.value.hint


def test_gguf_without_tokenizer(meta, tmp_path):
    no_tok = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    with pytest.raises(LoratuiError, match="has no tokenizer"):
        build_tokenizer(tmp_path / "x.gguf", no_tok)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(LoratuiError, match="not a readable GGUF"):
        read_gguf_metadata(f)
