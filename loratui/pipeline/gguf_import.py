"""Import a llama.cpp GGUF model into a Hugging Face directory, with a faithful tokenizer.

transformers' GGUF loader dequantizes the weights correctly, but the tokenizer it builds from a
GGUF differs from llama.cpp's for byte-level BPE models: it drops the pre-tokenizer that
``tokenizer.ggml.pre`` names (SmolLM2's ``smollm`` splits every digit), prepends a BOS the GGUF
does not ask for, and decodes with a SentencePiece-style chain. So for ``tokenizer.ggml.model ==
"gpt2"`` the tokenizer is rebuilt here from the GGUF metadata: the vocabulary and merges, the
pre-tokenizer regexes llama.cpp uses for that ``pre`` name, byte-level decoding, the control tokens
as special tokens, BOS/EOS only when the GGUF adds them, and the GGUF's chat template.
tests/pipeline/test_gguf_import.py checks the ids against llama.cpp on a varied corpus.

SentencePiece-style GGUFs (``tokenizer.ggml.model == "llama"``: Gemma, Llama 2, Mistral ...) go through
transformers' own converter, which matches llama.cpp's ids (measured on Gemma 3: the SmolLM2 corpus
plus Gemma's turn markers, identical but for a literal U+2581 next to a space, which transformers
folds into the whitespace token) except for three conventions fixed here: it never adds BOS although
the GGUF asks for it (``add_bos_token``), it leaves ``model_max_length`` unbounded, and it cannot
know a chat template the GGUF lacks (a Gemma 3 GGUF of the pretrained model carries none: Gemma 3's
own template is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratui.pipeline.errors import LoratuiError

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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


# Gemma 3's chat template, as the Gemma 3 checkpoints on the Hugging Face Hub ship it (tokenizer_config.json of
# google/gemma-3-*-it; llama.cpp's tests hold the same text). The GGUF of the pretrained gemma-3-270m has no
# tokenizer.chat_template, and without one the data step would fall back to ChatML, whose <|im_start|> markers
# are plain text to Gemma: this is the format its turn tokens (<start_of_turn>, <end_of_turn>) were made for.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# The chat template of an architecture whose GGUFs may lack one (keyed by general.architecture).
FALLBACK_CHAT_TEMPLATES: dict[str, str] = {"gemma3": GEMMA3_CHAT_TEMPLATE}

# Control tokens that end a chat turn. Generation must stop at them as at EOS: the imported
# generation_config lists them beside EOS (Gemma's own lists <eos> and <end_of_turn>).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

PRE_TOKENIZERS: dict[str, _PreTok] = {
    # digits one by one, then the GPT-2 split
    **{
        name: _PreTok(("digits", "gpt2"))
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
    },
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


def build_bpe_tokenizer(meta: dict[str, Any], source: str = "GGUF") -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer equivalent to llama.cpp's for a ``gpt2``-model GGUF."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    spec = _pre_tokenizer_spec(meta, source)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False, ignore_merges=spec.ignore_merges)
    )
    tok.pre_tokenizer = _pre_tokenizer(spec)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(_added_tokens(tokens, types))

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    added_bos = bos if meta.get("tokenizer.ggml.add_bos_token", False) else None
    added_eos = eos if meta.get("tokenizer.ggml.add_eos_token", False) else None
    _add_bos_eos(tok, vocab, added_bos, added_eos)

    context = _context_length(meta)
    # transformers' tokenizer classes have no annotations on __init__
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad or eos,
        model_max_length=context or 2048,
        clean_up_tokenization_spaces=False,
    )
    template = chat_template_for(meta)
    if template:
        fast.chat_template = template
    return fast


def _pre_tokenizer_spec(meta: dict[str, Any], source: str) -> _PreTok:
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise LoratuiError(
            f"{source}: tokenizer pre-tokenizer {pre_name!r} is not supported by the importer",
            hint=f"Supported: {', '.join(sorted(PRE_TOKENIZERS))}. Use the model's Hugging Face "
            "directory instead of its GGUF.",
        )
    return spec


def _pre_tokenizer(spec: _PreTok) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's split rules for the GGUF's ``pre`` name, then byte-level encoding."""
    from tokenizers import Regex, pre_tokenizers

    parts: list[pre_tokenizers.PreTokenizer] = []
    for rule in spec.rules:
        if rule == "digits":
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        elif rule == "gpt2":
            parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
        else:
            parts.append(pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False))
    if spec.rules[-1] != "gpt2":
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False))
    return pre_tokenizers.Sequence(parts)


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control and user-defined tokens are matched whole in the text, as llama.cpp does with
    parse_special=true; control tokens are skipped by decode(skip_special_tokens=True)."""
    from tokenizers import AddedToken

    return [
        AddedToken(tokens[i], special=(t == _CONTROL), normalized=False, lstrip=False, rstrip=False)
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
    ]


def _add_bos_eos(tok: Tokenizer, vocab: dict[str, int], bos: str | None, eos: str | None) -> None:
    """Put ``bos`` in front of and ``eos`` after every sequence (None: that one is not added)."""
    from tokenizers import processors

    if bos is None and eos is None:
        return
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join([*head, "$A", *tail]),
        pair=" ".join([*head, "$A", *tail, "$B:1", *(f"{t}:1" for t in tail)]),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)],
    )


def build_tokenizer(gguf_path: str | Path, meta: dict[str, Any] | None = None) -> Any:
    """The HF tokenizer for a GGUF file: rebuilt for byte-level BPE, transformers' own otherwise."""
    meta = meta if meta is not None else read_gguf_metadata(gguf_path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return build_bpe_tokenizer(meta, source=str(gguf_path))
    if kind is None:
        raise LoratuiError(f"{gguf_path}: the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    # SentencePiece-style vocabularies ("llama") convert faithfully with transformers' converter, but for
    # the conventions that _apply_gguf_conventions sets.
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _apply_gguf_conventions(tokenizer, meta)
    return tokenizer


def _context_length(meta: dict[str, Any]) -> int | None:
    return next((int(v) for k, v in meta.items() if k.endswith(".context_length")), None)


def chat_template_for(meta: dict[str, Any]) -> str | None:
    """The GGUF's chat template, else the one its architecture is known to use (None: neither)."""
    return meta.get("tokenizer.chat_template") or FALLBACK_CHAT_TEMPLATES.get(str(meta.get("general.architecture")))


def _apply_gguf_conventions(tokenizer: Any, meta: dict[str, Any]) -> None:
    """What transformers' GGUF tokenizer converter leaves out: BOS/EOS as the GGUF adds them, the context
    length, the chat template.

    llama.cpp adds BOS to every prompt of a GGUF with ``add_bos_token = true`` (Gemma's), and Gemma is
    trained with it in front: without it the model sees text it never saw in training.
    """
    tokenizer.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and tokenizer.bos_token is not None
    tokenizer.add_eos_token = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and tokenizer.eos_token is not None
    context = _context_length(meta)
    if context:
        tokenizer.model_max_length = context
    template = chat_template_for(meta)
    if template:
        tokenizer.chat_template = template


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
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
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
    stops = generation_stops(tokenizer, meta)
    if stops:
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    say("saving safetensors and tokenizer")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def generation_stops(tokenizer: Any, meta: dict[str, Any]) -> list[int]:
    """EOS, then the end-of-turn control tokens the chat template writes (Gemma's ``<end_of_turn>``).

    Generation with the imported model's own generation_config then stops at the end of a reply, as it does
    with the original checkpoint's (Gemma 3 lists ``[<eos>, <end_of_turn>]``), not at ``max_new_tokens``.
    """
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = [int(eos)] if eos is not None else []
    template = chat_template_for(meta) or ""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in template and token in vocab and vocab[token] not in stops:
            stops.append(int(vocab[token]))
    return stops
