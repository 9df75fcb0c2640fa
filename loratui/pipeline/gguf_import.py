"""Import a llama.cpp GGUF model into a Hugging Face directory, with a faithful tokenizer.

transformers' GGUF loader dequantizes the weights correctly, but the tokenizer it builds from a
GGUF differs from llama.cpp's for byte-level BPE models: it drops the pre-tokenizer that
``tokenizer.ggml.pre`` names (SmolLM2's ``smollm`` splits every digit), prepends a BOS the GGUF
does not ask for, and decodes with a SentencePiece-style chain. So for ``tokenizer.ggml.model ==
"gpt2"`` the tokenizer is rebuilt here from the GGUF metadata: the vocabulary and merges, the
pre-tokenizer regexes llama.cpp uses for that ``pre`` name, byte-level decoding, the control tokens
as special tokens, BOS/EOS only when the GGUF adds them, and the GGUF's chat template.
tests/pipeline/test_gguf_import.py checks the ids against llama.cpp on a varied corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# The pre-tokenizer split rules llama.cpp applies for each `tokenizer.ggml.pre` name
# (src/llama-vocab.cpp), as HF `tokenizers` pre-tokenizer specs. "digits" isolates each digit
# (llama.cpp's "\p{N}" rule); "gpt2" is ByteLevel's built-in GPT-2 regex; a string is a Split regex
# applied before a ByteLevel without its own regex. `ignore_merges` mirrors llama.cpp, which looks a
# whole pre-token up in the vocabulary before merging only for the llama-3 family.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTok:
    rules: tuple[str, ...]
    ignore_merges: bool = False


PRE_TOKENIZERS: dict[str, _PreTok] = {
    # digits one by one, then the GPT-2 split
    **{name: _PreTok(("digits", "gpt2")) for name in
       ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    "gpt-2": _PreTok(("gpt2",)),
    "gpt2": _PreTok(("gpt2",)),
    "llama-bpe": _PreTok((_LLAMA3_REGEX,), ignore_merges=True),
    "llama3": _PreTok((_LLAMA3_REGEX,), ignore_merges=True),
    "qwen2": _PreTok((_QWEN2_REGEX,)),
}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (tensor data is not read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error on non-GGUF bytes
        raise LoratuiError(f"{path}: not a readable GGUF file ({e})") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def build_bpe_tokenizer(meta: dict[str, Any], source: str = "GGUF") -> Any:
    """A transformers fast tokenizer equivalent to llama.cpp's for a ``gpt2``-model GGUF."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_name = meta.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise LoratuiError(
            f"{source}: tokenizer pre-tokenizer {pre_name!r} is not supported by the importer",
            hint=f"Supported: {', '.join(sorted(PRE_TOKENIZERS))}. Use the model's Hugging Face "
            "directory instead of its GGUF.",
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False,
                               ignore_merges=spec.ignore_merges))
    parts = []
    for rule in spec.rules:
        if rule == "digits":
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        elif rule == "gpt2":
            parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
        else:
            parts.append(pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False))
    if spec.rules[-1] != "gpt2":
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(parts)
    tok.decoder = decoders.ByteLevel()

    # Control and user-defined tokens are matched whole in the text, as llama.cpp does with
    # parse_special=true; control tokens are skipped by decode(skip_special_tokens=True).
    added = [
        AddedToken(tokens[i], special=(t == _CONTROL), normalized=False, lstrip=False, rstrip=False)
        for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = [bos] if add_bos else []
        tail = [eos] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]),
            pair=" ".join([*head, "$A", *tail, "$B:1", *(f"{t}:1" for t in tail)]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)],
        )

    context = next((int(v) for k, v in meta.items() if k.endswith(".context_length")), None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad or eos,
        model_max_length=context or 2048,
        clean_up_tokenization_spaces=False,
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def build_tokenizer(gguf_path: str | Path, meta: dict[str, Any] | None = None) -> Any:
    """The HF tokenizer for a GGUF file: rebuilt for byte-level BPE, transformers' own otherwise."""
    meta = meta if meta is not None else read_gguf_metadata(gguf_path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return build_bpe_tokenizer(meta, source=str(gguf_path))
    if kind is None:
        raise LoratuiError(f"{gguf_path}: the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    # SentencePiece-style vocabularies ("llama") convert faithfully with transformers' converter.
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def import_gguf(gguf_path: str | Path, out_dir: Path, log: Any = None) -> None:
    """Write a HF model directory (float32 safetensors, config, tokenizer) for a GGUF file into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(gguf_path)
    say = log or (lambda _msg: None)
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture", "?")
    say(f"importing {path.name} ({arch}, {path.stat().st_size / 1e6:.0f} MB): dequantizing weights")
    try:
        # transformers 5 keeps GGUF weights packed unless asked to unpack them: the import wants a plain
        # float32 model, trainable and saved as safetensors
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except (ValueError, KeyError, NotImplementedError) as e:
        raise LoratuiError(
            f"{path}: transformers cannot load this GGUF ({e})",
            hint="transformers' GGUF loader supports common architectures (llama, mistral, qwen2, "
            "phi3, gemma ...) with F32/F16/BF16/Q8_0/Q4/Q5/Q6/K-quant tensors.",
        ) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # already unpacked: drop the GGUF quantizer so the model saves as a plain one
        quantizer.remove_quantization_config(model)
    tokenizer = build_tokenizer(path, meta)
    for key, tok_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{tok_key}_token_id")
        if value is not None:
            setattr(model.config, key, int(value))
            setattr(model.generation_config, key, int(value))
    say("saving safetensors and tokenizer")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
