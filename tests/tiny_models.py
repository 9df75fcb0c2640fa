"""Tiny random models with real tokenizers, built in a fraction of a second, offline.

``make_tiny_model(out_dir, family=..., tokenizer=...)`` writes a Hugging Face directory that every
step can load like a real checkpoint. Families: ``llama`` and ``qwen2`` (two decoder families with
different attention biases), ``t5`` (an encoder-decoder, T5ForConditionalGeneration, for the
seq2seq path), two families that exist only in transformers 5:
- ``qwen3_5``: Qwen3_5ForCausalLM (Qwen3.5 text), a hybrid of Gated-DeltaNet linear-attention layers
  and gated full-attention layers, one full layer every ``QWEN3_5_FULL_EVERY`` (the real models' 3:1
  pattern; ``layers`` is rounded up to a multiple of it so both kinds appear).
- ``gemma4``: Gemma4ForCausalLM (Gemma 4 text), sliding-window and full-attention layers with
  different head sizes, per-layer input embeddings and proportional RoPE on the full layers.
and one family per architecture whose attention or layout differs from Llama's in a way that matters
to training (sliding windows are ``SLIDING_WINDOW`` = 8 tokens, shorter than test rows, so they cut):
- ``llama3``: LlamaForCausalLM with Llama 3.x ``llama3`` RoPE scaling (factor 8, theta 500k, an
  original context of 64 so all three frequency bands of the scaling occur at head_dim 16).
- ``mistral``: MistralForCausalLM, a sliding window on every layer (passed from the config).
- ``ministral``: MinistralForCausalLM (model_type ``ministral``), ``layer_types`` alternating
  sliding-window and full layers.
- ``ministral3``: Ministral3ForCausalLM (Ministral 3 / Mistral 3 text), YaRN RoPE and the Llama-4
  position-dependent query scale (``llama_4_scaling_beta``; ``original_max_position_embeddings`` is 16
  here so the scale changes inside test rows).
- ``qwen3``: Qwen3ForCausalLM, per-head RMSNorm on queries and keys, explicit head_dim.
- ``qwen3_moe``: Qwen3MoeForCausalLM, 4 experts, top-2 with normalized weights. Loaded, transformers 5
  holds the experts as 3-D Parameters ``mlp.experts.gate_up_proj`` / ``down_proj`` (not nn.Linear, so
  peft's all-linear misses them); the saved checkpoint keeps the released per-expert layout
  (``mlp.experts.N.gate_proj.weight`` ...).
- ``gemma2``: Gemma2ForCausalLM, attention logit soft-capping of 1.0 (so the cap really bends the
  scores), final logit soft-capping 5.0, ``query_pre_attn_scalar`` 24 (scaling != head_dim ** -0.5),
  alternating sliding-window / full layers, pre- and post-norms, scaled embeddings.
- ``gemma3``: Gemma3ForCausalLM (model_type ``gemma3_text``), sliding and full layers with their own
  RoPE bases, query/key norms, ``query_pre_attn_scalar`` 24.
- ``phi3``: Phi3ForCausalLM, fused ``qkv_proj`` and ``gate_up_proj``, a sliding window on every layer.
- ``granite``: GraniteForCausalLM, embedding / residual / logits multipliers and
  ``attention_multiplier`` 0.1 as the attention scaling.
- ``olmo2``: Olmo2ForCausalLM, post-norms only and RMSNorm over the whole query / key projections.
- ``smollm3``: SmolLM3ForCausalLM, 4 layers (at least) with ``no_rope_layers``: every 4th has no RoPE.
- ``gpt_oss``: GptOssForCausalLM, attention sinks (a learned logit per head, initialized at std 1 so
  they matter), alternating sliding-window / full layers, biased projections, 4 experts top-2 (3-D
  expert Parameters with biases, also on disk), YaRN RoPE. The tokenizer has no harmony special tokens.
Every family takes ``hidden`` / ``heads`` / ``kv_heads`` / ``layers`` / ``intermediate`` (MoE experts
use ``intermediate // 2`` each) and builds in well under a second.
Tokenizers:
- ``smollm2``: the SmolLM2 tokenizer (49k byte-level BPE, ChatML template), the one the GGUF importer
  rebuilds; llama.cpp's converter recognises it, so GGUF export can be tested on these models.
- ``bpe``: a 400-token byte-level BPE trained here on a few lines, with the same special tokens and
  template: the fastest option when the vocabulary does not matter. For ``t5`` it is trained with
  T5's special tokens instead (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and has no chat template, like
  T5 / FLAN-T5 checkpoints.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's own vocabulary
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Opening hours are 9:00 to 17:00 from Monday to Friday.",
    "Contact us at info@example.org or visit https://example.org/help.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is the fee? Answer: 25 EUR per year.",
] * 4


@functools.lru_cache(maxsize=None)
def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from loratui.pipeline import models

    gguf = models.builtin_gguf(models.DEFAULT_MODEL)
    imported = models.imported_dir(gguf, models.DEFAULT_MODEL)
    if (imported / "tokenizer.json").is_file():  # already prepared by `make test`: fastest
        return AutoTokenizer.from_pretrained(str(imported))
    from loratui.pipeline.gguf_import import build_tokenizer

    return build_tokenizer(gguf)


@functools.lru_cache(maxsize=None)
def _small_bpe_tokenizer(flavour: Literal["chatml", "t5"] = "chatml") -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=T5_SPECIAL if flavour == "t5" else SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if flavour == "t5":  # no BOS, no chat template and no token_type_ids, as T5 / FLAN-T5 ship
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", model_max_length=512,
                                       model_input_names=["input_ids", "attention_mask"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", model_max_length=512)
    fast.chat_template = CHATML
    return fast


Family = Literal["llama", "qwen2", "t5", "qwen3_5", "gemma4", "llama3", "mistral", "ministral", "ministral3",
                 "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "granite", "olmo2", "smollm3", "gpt_oss"]
CAUSAL_FAMILIES = ("llama", "qwen2", "qwen3_5", "gemma4", "llama3", "mistral", "ministral", "ministral3", "qwen3",
                   "qwen3_moe", "gemma2", "gemma3", "phi3", "granite", "olmo2", "smollm3", "gpt_oss")
SLIDING_WINDOW = 8  # the sliding window of the mistral, ministral, gemma2, gemma3, phi3 and gpt_oss families


def make_tiny_model(
    out_dir: str | Path,
    *,
    family: Family = "llama",
    tokenizer: Literal["smollm2", "bpe"] = "bpe",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> Path:
    """Write a tiny random model plus tokenizer to ``out_dir`` (weights stored in ``dtype``) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    if family == "t5":
        return _make_tiny_t5(out, tokenizer, hidden, layers, heads, intermediate, seed)
    tok = _smollm2_tokenizer() if tokenizer == "smollm2" else _small_bpe_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    if family == "qwen3_5":
        config = _qwen3_5_config(common, heads)
    elif family == "gemma4":
        config = _gemma4_config(common)
    elif family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family in _FAMILY_CONFIGS:
        config = _FAMILY_CONFIGS[family](common)
    else:
        raise ValueError(f"unknown tiny model family {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen3_5":
        _realistic_linear_attention(model)
    if family == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


QWEN3_5_FULL_EVERY = 4  # llama.cpp's qwen35 reads the layer kinds from this interval, as the real models use


def _qwen3_5_config(common: dict[str, Any], heads: int) -> Any:
    """Qwen3.5 text: 3 Gated-DeltaNet layers, then 1 gated full-attention layer (repeated).

    Full attention: head_dim 32 (q_proj is twice as wide: query and output gate), RoPE on a quarter of
    it as in the real models, with interleaved MRoPE sections that fit those 8 dimensions (llama.cpp
    asserts the sections fit; the real [11, 11, 10] would not). Linear attention: 2 key heads and 4
    value heads of 16 (more value than key heads, as in the real models, so the converter's
    value-head reordering is exercised; llama.cpp assumes equal key and value head sizes).
    """
    from transformers import Qwen3_5TextConfig

    layers = -(-common["num_hidden_layers"] // QWEN3_5_FULL_EVERY) * QWEN3_5_FULL_EVERY
    rope = {"rope_type": "default", "rope_theta": common["rope_theta"], "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    kwargs = {k: v for k, v in common.items() if k not in ("rope_theta", "num_hidden_layers", "rms_norm_eps")}
    return Qwen3_5TextConfig(
        **kwargs, num_hidden_layers=layers, rms_norm_eps=1e-6, head_dim=32, rope_parameters=rope,
        layer_types=["full_attention" if (i + 1) % QWEN3_5_FULL_EVERY == 0 else "linear_attention" for i in range(layers)],
        linear_num_key_heads=max(1, heads // 2), linear_num_value_heads=heads, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4,
    )


def _realistic_linear_attention(model: Any) -> None:
    """Short-convolution weights of a trained model's size (std 0.5) instead of the 0.02 initialization.

    With 0.02, the queries and keys reaching the Gated DeltaNet's L2 normalization have squared norms
    around 1e-4, where its epsilon (1e-6 inside the root in transformers, a floor of ``rms_norm_eps`` on
    the norm in llama.cpp) moves the result by about 0.3%: enough to flip near-ties between the two
    runtimes. Trained Qwen3.5 checkpoints are nowhere near there.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.conv1d.weight.normal_(0.0, 0.5)


def _gemma4_config(common: dict[str, Any]) -> Any:
    """Gemma 4 text: sliding-window layers and a full-attention last layer (head_dim 16 / 32), per-layer
    input embeddings of 8 per layer, proportional RoPE on a quarter of the full layers' heads."""
    from transformers import Gemma4TextConfig

    layers = common["num_hidden_layers"]
    kwargs = {k: v for k, v in common.items() if k not in ("rope_theta",)}
    return Gemma4TextConfig(
        **kwargs, head_dim=16, global_head_dim=32, sliding_window=GEMMA4_WINDOW,
        layer_types=["full_attention" if i == layers - 1 else "sliding_attention" for i in range(layers)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": common["rope_theta"]},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1_000_000.0}},
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=common["vocab_size"],
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    )


GEMMA4_WINDOW = 32  # shorter than the test rows, so the sliding window really cuts


def _head_dim(common: dict[str, Any]) -> int:
    return common["hidden_size"] // common["num_attention_heads"]


def _alternating(layers: int) -> list[str]:
    """Sliding-window and full-attention layers in turn, starting with a sliding one (Gemma 2's pattern)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _llama3_config(common: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in common.items() if k != "rope_theta"}
    rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": common["max_position_embeddings"] // 8}
    return LlamaConfig(**kwargs, rope_parameters=rope)


def _mistral_config(common: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**common, head_dim=_head_dim(common), sliding_window=SLIDING_WINDOW)


def _ministral_config(common: dict[str, Any]) -> Any:
    from transformers import MinistralConfig

    return MinistralConfig(**common, head_dim=_head_dim(common), sliding_window=SLIDING_WINDOW,
                           layer_types=_alternating(common["num_hidden_layers"]))


def _ministral3_config(common: dict[str, Any]) -> Any:
    from transformers import Ministral3Config

    kwargs = {k: v for k, v in common.items() if k != "rope_theta"}
    rope = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": common["max_position_embeddings"] / 16,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
    return Ministral3Config(**kwargs, head_dim=_head_dim(common), rope_parameters=rope)


def _qwen3_config(common: dict[str, Any]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=_head_dim(common))


def _qwen3_moe_config(common: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common, head_dim=_head_dim(common), num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=common["intermediate_size"] // 2, norm_topk_prob=True,
                          decoder_sparse_step=1)


def _gemma2_config(common: dict[str, Any]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**common, head_dim=_head_dim(common), sliding_window=SLIDING_WINDOW,
                        attn_logit_softcapping=1.0, final_logit_softcapping=5.0, query_pre_attn_scalar=24,
                        hidden_activation="gelu_pytorch_tanh")


def _gemma3_config(common: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    kwargs = {k: v for k, v in common.items() if k != "rope_theta"}
    return Gemma3TextConfig(**kwargs, head_dim=_head_dim(common), sliding_window=SLIDING_WINDOW,
                            query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                            layer_types=_alternating(common["num_hidden_layers"]))


def _phi3_config(common: dict[str, Any]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**common, sliding_window=SLIDING_WINDOW, original_max_position_embeddings=512)


def _granite_config(common: dict[str, Any]) -> Any:
    from transformers import GraniteConfig

    return GraniteConfig(**common, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                         attention_multiplier=0.1)


def _olmo2_config(common: dict[str, Any]) -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(**common)


def _smollm3_config(common: dict[str, Any]) -> Any:
    from transformers import SmolLM3Config

    kwargs = {**common, "num_hidden_layers": max(4, common["num_hidden_layers"])}
    return SmolLM3Config(**kwargs, no_rope_layer_interval=4)


def _gpt_oss_config(common: dict[str, Any]) -> Any:
    from transformers import GptOssConfig

    kwargs = {k: v for k, v in common.items() if k not in ("rope_theta", "intermediate_size")}
    rope = {"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": common["max_position_embeddings"] // 32}
    return GptOssConfig(**kwargs, head_dim=_head_dim(common), intermediate_size=common["intermediate_size"] // 2,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=SLIDING_WINDOW,
                        rope_parameters=rope)


_FAMILY_CONFIGS = {
    "llama3": _llama3_config, "mistral": _mistral_config, "ministral": _ministral_config,
    "ministral3": _ministral3_config, "qwen3": _qwen3_config, "qwen3_moe": _qwen3_moe_config,
    "gemma2": _gemma2_config, "gemma3": _gemma3_config, "phi3": _phi3_config, "granite": _granite_config,
    "olmo2": _olmo2_config, "smollm3": _smollm3_config, "gpt_oss": _gpt_oss_config,
}


def _make_tiny_t5(out: Path, tokenizer: str, hidden: int, layers: int, heads: int, intermediate: int,
                  seed: int) -> Path:
    """A tiny T5ForConditionalGeneration: encoder and decoder of ``layers`` each, decoder start = pad."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _smollm2_tokenizer() if tokenizer == "smollm2" else _small_bpe_tokenizer("t5")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = T5Config(
        vocab_size=len(tok), d_model=hidden, d_kv=hidden // heads, d_ff=intermediate, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, feed_forward_proj="relu", tie_word_embeddings=True,
        pad_token_id=pad, eos_token_id=tok.eos_token_id, decoder_start_token_id=pad,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).to(torch.float32)
    model.generation_config.decoder_start_token_id = pad
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
