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
- ``olmo2``: Olmo2ForCausalLM, post-norms only and RMSNorm over the whole query / key projections; an
  untied output head, as released (llama.cpp's olmo2 graph requires one).
- ``smollm3``: SmolLM3ForCausalLM, 4 layers (at least) with ``no_rope_layers``: every 4th has no RoPE.
- ``gpt_oss``: GptOssForCausalLM, attention sinks (a learned logit per head, initialized at std 1 so
  they matter), alternating sliding-window / full layers, biased projections, 4 experts top-2 (3-D
  expert Parameters with biases, also on disk), YaRN RoPE, an untied output head (as released; llama.cpp's
  gpt-oss graph requires one). The tokenizer has no harmony special tokens.
Every family takes ``hidden`` / ``heads`` / ``kv_heads`` / ``layers`` / ``intermediate`` (MoE experts
use ``intermediate // 2`` each) and builds in well under a second.
Tokenizers:
- ``smollm2``: the SmolLM2 tokenizer (49k byte-level BPE, ChatML template), the one the GGUF importer
  rebuilds; llama.cpp's converter recognises it, so GGUF export can be tested on these models.
- ``bpe``: a 400-token byte-level BPE trained here on a few lines, with the same special tokens and
  template: the fastest option when the vocabulary does not matter. For ``t5`` it is trained with
  T5's special tokens instead (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and has no chat template, like
  T5 / FLAN-T5 checkpoints.
- ``qwen2``: Qwen's own vocabulary (Qwen2 / Qwen2.5 / Qwen3, 152k tokens), rebuilt from llama.cpp's
  vocab-only GGUF of the family assets (``make assets``) with the ChatML template: transformers 5 gives
  every ``qwen2`` model Qwen2's pre-tokenizer whatever its tokenizer.json says, and llama.cpp's converter
  recognizes that pre-tokenizer with Qwen's vocabulary only. Built once, kept beside the assets.
- ``spm``: a SentencePiece BPE vocabulary (byte fallback, about 600 pieces) trained here on a few lines,
  shipped as checkpoints of SentencePiece families ship it: ``tokenizer.model`` beside the transformers
  tokenizer made from it (llama.cpp's converter reads the ``.model`` for Gemma 2 and Phi-3, and for
  Gemma 3 when there is one). Laid out like the family's own (:data:`SPM_LAYOUTS`): Gemma's
  (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<start_of_turn>`` 106, ``<end_of_turn>`` 107 in
  the SentencePiece model, no dummy prefix, BOS added) for ``gemma2`` / ``gemma3``, Llama 2's
  (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, a dummy prefix) with Phi-3's chat tokens added after the
  SentencePiece vocabulary for ``phi3``. Trained with the ``sentencepiece`` package of llama.cpp's
  converter folder (requirements-converter.txt), in its own process, so the test environment needs
  no SentencePiece of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
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


@functools.cache
def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from loratui.pipeline import models

    gguf = models.builtin_gguf(models.DEFAULT_MODEL)
    imported = models.imported_dir(gguf, models.DEFAULT_MODEL)
    if (imported / "tokenizer.json").is_file():  # already prepared by `make test`: fastest
        return AutoTokenizer.from_pretrained(str(imported))
    from loratui.pipeline.gguf_import import build_tokenizer

    return build_tokenizer(gguf)


@functools.cache
def _small_bpe_tokenizer(flavour: Literal["chatml", "t5"] = "chatml") -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=T5_SPECIAL if flavour == "t5" else SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if flavour == "t5":  # no BOS, no chat template and no token_type_ids, as T5 / FLAN-T5 ship
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            model_max_length=512,
            model_input_names=["input_ids", "attention_mask"],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        model_max_length=512,
    )
    fast.chat_template = CHATML
    return fast


@dataclass(frozen=True)
class SpmLayout:
    """A SentencePiece vocabulary laid out as a family's released one."""

    ids: dict[str, int]  # trainer ids: pad_id, eos_id, bos_id, unk_id (-1: none)
    pieces: dict[str, str]  # their pieces: pad_piece ...
    user_defined: tuple[str, ...]  # pieces of the SentencePiece model right after those
    dummy_prefix: bool  # SentencePiece's add_dummy_prefix (a space before the text)
    tokenizer_class: str  # the transformers class its checkpoints name
    added: tuple[str, ...] = ()  # special tokens added after the SentencePiece vocabulary (tokenizer.json)
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    add_bos: bool = False


_GEMMA_SPM = SpmLayout(
    ids={"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3},
    pieces={"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>"},
    # <mask> 4, [@BOS@] 5, <unused0..99> 6..105, then the turn markers at 106 and 107 as in Gemma 2 / 3
    user_defined=("<mask>", "[@BOS@]", *(f"<unused{i}>" for i in range(100)), "<start_of_turn>", "<end_of_turn>"),
    dummy_prefix=False,
    tokenizer_class="GemmaTokenizer",
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    add_bos=True,
)
SPM_LAYOUTS: dict[str, SpmLayout] = {
    "gemma2": _GEMMA_SPM,
    "gemma3": _GEMMA_SPM,
    # Gemma 4: the same layout, with its own turn markers (<|turn> opens a turn, <turn|> closes it)
    "gemma4": dataclasses.replace(_GEMMA_SPM, user_defined=(*_GEMMA_SPM.user_defined[:-2], "<|turn>", "<turn|>")),
    # Phi-3.5-mini: Llama 2's SentencePiece model, the chat tokens added after it (32000 and up there)
    "phi3": SpmLayout(
        ids={"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        pieces={"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"},
        user_defined=(),
        dummy_prefix=True,
        tokenizer_class="LlamaTokenizer",
        added=(
            "<|endoftext|>",
            "<|assistant|>",
            "<|placeholder1|>",
            "<|placeholder2|>",
            "<|placeholder3|>",
            "<|placeholder4|>",
            "<|system|>",
            "<|end|>",
            "<|placeholder5|>",
            "<|placeholder6|>",
            "<|user|>",
        ),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
    ),
}
SPM_FILE = "tokenizer.model"

_SPM_SCRIPT = """
import json, shutil, sys
from pathlib import Path

import sentencepiece as spm

out, layout, corpus = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus), model_prefix=str(out / "spm"), model_type="bpe", vocab_size=600,
    hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
    allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=layout["dummy_prefix"], minloglevel=2, **layout["ids"], **layout["pieces"],
    **({"user_defined_symbols": layout["user_defined"]} if layout["user_defined"] else {}))
source = out / "source"
source.mkdir()
shutil.move(str(out / "spm.model"), str(source / "tokenizer.model"))
import transformers
from tokenizers import AddedToken

cls = getattr(transformers, layout["tokenizer_class"])
tok = cls.from_pretrained(str(source), legacy=False, add_bos_token=layout["add_bos"], add_eos_token=False)
if layout["added"]:
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in layout["added"]]})
for key in ("bos", "eos", "pad"):
    if layout[key]:
        setattr(tok, key + "_token", layout[key])
tok.save_pretrained(str(out / "hf"))
"""


@functools.cache
def _spm_tokenizer(family: str) -> tuple[Any, Path]:
    """(the transformers tokenizer, its tokenizer.model) for ``family``'s SentencePiece layout."""
    import atexit
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from transformers import AutoTokenizer

    from loratui.exporters.gguf import converter_dir

    layout = SPM_LAYOUTS.get(family)
    if layout is None:
        raise ValueError(f"no SentencePiece layout for the tiny model family {family!r}: {sorted(SPM_LAYOUTS)}")
    out = Path(tempfile.mkdtemp(prefix=f"tiny-spm-{family}-"))
    atexit.register(shutil.rmtree, out, True)  # the models made from it hold their own copy
    corpus = _CORPUS[:5] + [f"{t} {t.lower()} {t.upper()}" for t in _CORPUS[:5]]
    folder = converter_dir()  # llama.cpp's converter folder: its own sentencepiece, first on the path
    proc = subprocess.run(
        [sys.executable, "-c", _SPM_SCRIPT, str(out), json.dumps(dataclasses.asdict(layout)), json.dumps(corpus)],
        capture_output=True,
        text=True,
        cwd=str(folder),
        env={**os.environ, "PYTHONPATH": str(folder)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training the SentencePiece vocabulary failed:\n{proc.stderr[-3000:]}")
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    tok.chat_template = CHATML
    return tok, out / "source" / SPM_FILE


@functools.cache
def _qwen2_tokenizer() -> Any:
    """Qwen's own tokenizer (Qwen2 / Qwen2.5: 152k tokens, Qwen2's pre-tokenizer) with the ChatML template,
    rebuilt from llama.cpp's vocab-only GGUF of the family assets (tests/family_assets.py) as the GGUF importer
    rebuilds one. Built once (about 10 s) and kept beside the assets, in ``tokenizers/qwen2/``."""
    import os
    import tempfile

    from transformers import AutoTokenizer

    from tests.family_assets import vocab

    source = vocab("qwen2")
    kept = source.parent.parent / "tokenizers" / "qwen2"
    if not (kept / "tokenizer.json").is_file():
        from loratui.pipeline.gguf_import import build_tokenizer

        kept.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".qwen2-", dir=kept.parent))
        build_tokenizer(source).save_pretrained(str(staging))
        try:
            os.rename(staging, kept)  # whole or not at all; another process may have been first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(kept))
    tok.chat_template = CHATML
    return tok


Family = Literal[
    "llama",
    "qwen2",
    "t5",
    "qwen3_5",
    "gemma4",
    "llama3",
    "mistral",
    "ministral",
    "ministral3",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "phi3",
    "granite",
    "olmo2",
    "smollm3",
    "gpt_oss",
]
CAUSAL_FAMILIES = (
    "llama",
    "qwen2",
    "qwen3_5",
    "gemma4",
    "llama3",
    "mistral",
    "ministral",
    "ministral3",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "phi3",
    "granite",
    "olmo2",
    "smollm3",
    "gpt_oss",
)
SLIDING_WINDOW = 8  # the sliding window of the mistral, ministral, gemma2, gemma3, phi3 and gpt_oss families


def make_tiny_model(
    out_dir: str | Path,
    *,
    family: Family = "llama",
    tokenizer: Literal["smollm2", "bpe", "spm", "qwen2"] = "bpe",
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
    spm_file = None
    if tokenizer == "spm":
        tok, spm_file = _spm_tokenizer(family)
    elif tokenizer == "qwen2":
        tok = _qwen2_tokenizer()
    else:
        tok = _smollm2_tokenizer() if tokenizer == "smollm2" else _small_bpe_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
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
    save_tokenizer(tok, out, spm_file)
    return out


def save_tokenizer(tok: Any, out: str | Path, spm_file: Path | None = None) -> None:
    """``tok`` into ``out`` as a released checkpoint holds it: with the SentencePiece model it was made from
    (``spm_file``; None: it has none), which transformers 5's save_pretrained leaves out."""
    tok.save_pretrained(str(out))
    if spm_file is not None and spm_file.is_file():
        shutil.copyfile(spm_file, Path(out) / SPM_FILE)


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
    rope = {
        "rope_type": "default",
        "rope_theta": common["rope_theta"],
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    }
    kwargs = {k: v for k, v in common.items() if k not in ("rope_theta", "num_hidden_layers", "rms_norm_eps")}
    return Qwen3_5TextConfig(
        **kwargs,
        num_hidden_layers=layers,
        rms_norm_eps=1e-6,
        head_dim=32,
        rope_parameters=rope,
        layer_types=[
            "full_attention" if (i + 1) % QWEN3_5_FULL_EVERY == 0 else "linear_attention" for i in range(layers)
        ],
        linear_num_key_heads=max(1, heads // 2),
        linear_num_value_heads=heads,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
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
        **kwargs,
        head_dim=16,
        global_head_dim=32,
        sliding_window=GEMMA4_WINDOW,
        layer_types=["full_attention" if i == layers - 1 else "sliding_attention" for i in range(layers)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": common["rope_theta"]},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=common["vocab_size"],
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None,
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
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": common["max_position_embeddings"] // 8,
    }
    return LlamaConfig(**kwargs, rope_parameters=rope)


def _mistral_config(common: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**common, head_dim=_head_dim(common), sliding_window=SLIDING_WINDOW)


def _ministral_config(common: dict[str, Any]) -> Any:
    from transformers import MinistralConfig

    return MinistralConfig(
        **common,
        head_dim=_head_dim(common),
        sliding_window=SLIDING_WINDOW,
        layer_types=_alternating(common["num_hidden_layers"]),
    )


def _ministral3_config(common: dict[str, Any]) -> Any:
    from transformers import Ministral3Config

    kwargs = {k: v for k, v in common.items() if k != "rope_theta"}
    rope = {
        "rope_type": "yarn",
        "rope_theta": 1_000_000.0,
        "factor": common["max_position_embeddings"] / 16,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale_all_dim": 1.0,
        "mscale": 1.0,
        "llama_4_scaling_beta": 0.1,
    }
    return Ministral3Config(**kwargs, head_dim=_head_dim(common), rope_parameters=rope)


def _qwen3_config(common: dict[str, Any]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=_head_dim(common))


def _qwen3_moe_config(common: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **common,
        head_dim=_head_dim(common),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=common["intermediate_size"] // 2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
    )


def _gemma2_config(common: dict[str, Any]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **common,
        head_dim=_head_dim(common),
        sliding_window=SLIDING_WINDOW,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=5.0,
        query_pre_attn_scalar=24,
        hidden_activation="gelu_pytorch_tanh",
    )


def _gemma3_config(common: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    kwargs = {k: v for k, v in common.items() if k != "rope_theta"}
    return Gemma3TextConfig(
        **kwargs,
        head_dim=_head_dim(common),
        sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=24,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=_alternating(common["num_hidden_layers"]),
    )


def _phi3_config(common: dict[str, Any]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**common, sliding_window=SLIDING_WINDOW, original_max_position_embeddings=512)


def _granite_config(common: dict[str, Any]) -> Any:
    from transformers import GraniteConfig

    return GraniteConfig(
        **common, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0, attention_multiplier=0.1
    )


def _olmo2_config(common: dict[str, Any]) -> Any:
    from transformers import Olmo2Config

    # untied, as every released OLMo 2: llama.cpp's olmo2 graph requires its own output matrix
    return Olmo2Config(**{**common, "tie_word_embeddings": False})


def _smollm3_config(common: dict[str, Any]) -> Any:
    from transformers import SmolLM3Config

    kwargs = {**common, "num_hidden_layers": max(4, common["num_hidden_layers"])}
    return SmolLM3Config(**kwargs, no_rope_layer_interval=4)


def _gpt_oss_config(common: dict[str, Any]) -> Any:
    from transformers import GptOssConfig

    # untied, as gpt-oss-20b/120b: llama.cpp's gpt-oss graph requires its own output matrix
    kwargs = {k: v for k, v in common.items() if k not in ("rope_theta", "intermediate_size")}
    kwargs["tie_word_embeddings"] = False
    rope = {
        "rope_type": "yarn",
        "rope_theta": 150_000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        # gpt-oss's own original context: onnxruntime-genai's builder asserts the YaRN correction range
        # lies inside the rotary dimensions, which a tiny original context would break
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }
    return GptOssConfig(
        **kwargs,
        head_dim=_head_dim(common),
        intermediate_size=common["intermediate_size"] // 2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SLIDING_WINDOW,
        rope_parameters=rope,
    )


_FAMILY_CONFIGS = {
    "llama3": _llama3_config,
    "mistral": _mistral_config,
    "ministral": _ministral_config,
    "ministral3": _ministral3_config,
    "qwen3": _qwen3_config,
    "qwen3_moe": _qwen3_moe_config,
    "gemma2": _gemma2_config,
    "gemma3": _gemma3_config,
    "phi3": _phi3_config,
    "granite": _granite_config,
    "olmo2": _olmo2_config,
    "smollm3": _smollm3_config,
    "gpt_oss": _gpt_oss_config,
}


def _make_tiny_t5(
    out: Path, tokenizer: str, hidden: int, layers: int, heads: int, intermediate: int, seed: int
) -> Path:
    """A tiny T5ForConditionalGeneration: encoder and decoder of ``layers`` each, decoder start = pad."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _smollm2_tokenizer() if tokenizer == "smollm2" else _small_bpe_tokenizer("t5")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = T5Config(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=hidden // heads,
        d_ff=intermediate,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=pad,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).to(torch.float32)
    model.generation_config.decoder_start_token_id = pad
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
