"""Runs onnxruntime-genai's model builder in its own process, with two transformers-5 gaps closed.
Standalone on purpose: it imports nothing from loratui.

    python onnx_entry.py <onnxruntime_genai.models.builder arguments>

The builder (onnxruntime-genai 0.18) reads configs the way transformers 4 wrote them; two families'
transformers-5 configs would fail or be built wrong, so they are adapted here, in the builder's process:

* **Per-layer-type RoPE (Gemma 3).** transformers 5 keeps one ``rope_parameters`` entry per layer kind
  (``full_attention``, ``sliding_attention``), where transformers 4 had one global RoPE and a
  ``rope_local_base_freq`` for the sliding layers. The builder indexes ``rope_parameters["rope_type"]``
  and reads ``rope_local_base_freq``; both are derived back (:func:`flatten_rope`).
* **SmolLM3's no-RoPE layers.** The builder's SmolLM3 switches RoPE off in a layer by saying that RoPE is
  not fused into attention, which makes it apply RoPE as a separate op from a ``position_ids`` input the
  CPU graph does not have (``KeyError: 'position_ids'``). Such a layer has no RoPE at all: the entry
  switches RoPE itself off for it.

The verification that follows every build (the ONNX model's logits against the merged model's) is what
shows these adaptations are right.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

BUILDER = "onnxruntime_genai.models.builder"


def flatten_rope(config: Any) -> Any:
    """A config with per-layer-type ``rope_parameters`` given the transformers-4 form the builder reads:
    the full-attention layers' parameters as the global ones, the sliding layers' base as
    ``rope_local_base_freq``. Other configs are returned unchanged."""
    for c in (config, getattr(config, "text_config", None)):
        if c is None:
            continue
        params = getattr(c, "rope_parameters", None)
        if not isinstance(params, dict) or not isinstance(params.get("full_attention"), dict):
            continue
        full, local = dict(params["full_attention"]), params.get("sliding_attention")
        if isinstance(local, dict) and "rope_theta" in local and getattr(c, "rope_local_base_freq", None) is None:
            c.rope_local_base_freq = local["rope_theta"]
        c.rope_parameters = full
        if "rope_theta" in full:
            c.rope_theta = full["rope_theta"]
    return config


def _patch() -> None:
    import transformers

    load = transformers.AutoConfig.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return flatten_rope(load(cls, *args, **kwargs))

    # patched on purpose, in this converter process only
    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as the builder expects)

    # the builder imports its classes as the top-level package `builders`: patch that module, not
    # onnxruntime_genai.models.builders (a second copy of the same file)
    from builders import smollm  # type: ignore[import-not-found]

    make_attention = smollm.SmolLM3Model.make_attention

    def smollm3_attention(self: Any, layer_id: int, attention: Any, root_input: Any, **kwargs: Any) -> Any:
        rope = self.attention_attrs["rope"]
        self.attention_attrs["rope"] = rope and bool(self.no_rope_layers[layer_id])
        try:
            return make_attention(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = rope

    smollm.SmolLM3Model.make_attention = smollm3_attention


if __name__ == "__main__":
    _patch()
    sys.argv[0] = BUILDER
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)
