"""Examples -> token ids and labels, with the loss mask on assistant turns.

Causal (decoder-only) models: a chat is rendered once through its chat template. The span of each
assistant turn is found by rendering the conversation up to that turn with the generation prompt
(what the model sees before answering) and up to the end of that turn: the difference is exactly
what the model must produce, including the template's end-of-turn token. The whole text is then
tokenized once with offsets, and a token is trained when it starts inside an assistant span. If the
template does not end the last answer with EOS, EOS is appended and trained, so the model learns to
stop.

That needs a template whose render of a conversation starts with its render of every shorter one.
Many rewrite earlier turns instead: Qwen3 shows the reasoning only after the last question, Phi-3.5
appends EOS only at the end, GPT-OSS ends the last answer with ``<|return|>`` and earlier ones with
``<|end|>``, the DeepSeek-R1 distills strip the reasoning from every answer. A row such a template
renders inconsistently becomes one example per assistant turn (:func:`render_examples`): the
conversation up to that turn, rendered as if it were the last (exactly what the model sees when it
writes that reply), with only that reply trained. Where a generation prompt opens a think block
(``<think>\n``, R1), the reply is what the model writes after it: the reasoning, the answer, the end
of turn. Where it closes an empty reasoning block instead (Gemma 4's ``<|channel>thought\n<channel|>``),
or the template writes the earlier conversation differently before a question than before a reply
(Mistral Nemo puts the system prompt into the last question only), the example is that generation
prompt followed by the reply as the template writes it. The examples of a row are numbered by
``chunk`` from its last turn (0, the whole conversation, as before) backwards, so evaluation still
generates one reply per row.

Encoder-decoder (seq2seq) models: an example is a source text for the encoder and a target for the
decoder (:func:`seq2seq_texts`, :func:`encode_seq2seq_batch`); ``labels`` are the target's ids, EOS
last, all trained, and no chat template is involved.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loratui.pipeline.data.templates import ChatTemplate, content_is_opaque, has_reasoning
from loratui.pipeline.errors import LoratuiError

IGNORE = -100
PIPELINE_ROWS = 250  # rendered examples per tokenizer call inside a batch

Spans = list[tuple[int, int]]
# One example of a row: its text, the character spans to train, and how many of the row's messages it holds.
Rendered = tuple[str, Spans, int]
# A chat row (messages, "file, row N" for errors) -> its examples: render_examples, or a ShapeRenderer.
Render = Callable[[list[dict[str, str]], str], list[Rendered]]

# What a generation prompt may add after the start of the reply the template renders: a think block
# opened for the model to reason in, or an empty reasoning block closed (the thinking mode is off:
# R1-Qwen's think block, Gemma 4's thought channel).
_OPENS_THINK = re.compile(r"<think>(\s*)")
_CLOSED_THINK = re.compile(r"<think>\s*</think>\s*|<\|channel>thought\s*<channel\|>\s*")
_OPENING_TAG = re.compile(r"\s*<think>")
_PROBE = "\x00loratui-reply\x00"


class RewritesEarlierTurns(LoratuiError):
    """The template renders a conversation differently from its own prefixes: one render cannot hold every turn."""


def render_chat(
    messages: list[dict[str, str]], template: ChatTemplate, eos: str, train_on_prompt: bool
) -> tuple[str, Spans]:
    """The rendered text and the character spans to train on (the reference implementation).

    An assistant span runs from the end of the generation prompt to the end of its turn: through the
    last EOS inside the turn when the template writes one there, else to the turn's end; when the
    last answer has no EOS, EOS is appended and trained. Raises :class:`RewritesEarlierTurns` when
    one render cannot be split into the turns (then :func:`render_examples` renders per turn).
    """
    flags = {has_reasoning(m["content"]) for m in messages if m["role"] == "assistant"}
    if template.thinking_switch and len(flags) > 1:  # one render cannot switch thinking per reply
        raise _rewrites(template)
    thinking = flags == {True}
    full = template.render(messages, thinking=thinking)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True, thinking=thinking)
        upto = full if k == len(messages) - 1 else template.render(messages[: k + 1], thinking=thinking)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise _rewrites(template)
        start = len(before)
        end = upto.rfind(eos, start) if eos else -1
        spans.append((start, end + len(eos) if end >= 0 else len(upto)))
    if eos and spans and eos not in full[spans[-1][0] : spans[-1][1]]:
        full += eos
        spans[-1] = (spans[-1][0], len(full))
    if train_on_prompt:
        spans = [(0, len(full))]
    return full, spans


def _rewrites(template: ChatTemplate) -> RewritesEarlierTurns:
    return RewritesEarlierTurns(
        f"the {template.name} chat template renders a conversation differently from its own prefixes, "
        "so the assistant turns cannot be located in one render"
    )


def render_turn(
    messages: list[dict[str, str]], k: int, template: ChatTemplate, eos: str, train_on_prompt: bool, where: str = ""
) -> tuple[str, Spans]:
    """``messages[:k + 1]`` as the model sees it when it writes reply ``k``, with only that reply trained.

    The text is the template's render of the conversation ending with reply ``k``; the trained span
    starts where the generation prompt (:meth:`ChatTemplate.reply_prompt`) ends and runs to the end of
    the turn, with the same EOS rules as :func:`render_chat`. When the generation prompt is not the
    start of that render, see :func:`_after_generation_prompt`. ``where`` (file, row) goes into errors.
    """
    prompt = template.reply_prompt(messages[: k + 1])
    text = template.render(messages[: k + 1], thinking=has_reasoning(messages[k]["content"]))
    if not text.startswith(prompt):
        text = _after_generation_prompt(messages, k, template, prompt, text, where)
    start = len(prompt)
    found = text.rfind(eos, start) if eos else -1
    end = found + len(eos) if found >= 0 else len(text)
    if eos and eos not in text[start:end]:
        text += eos
        end = len(text)
    return text, [(0, len(text)) if train_on_prompt else (start, end)]


def _after_generation_prompt(
    messages: list[dict[str, str]], k: int, template: ChatTemplate, prompt: str, text: str, where: str
) -> str:
    """The text for reply ``k`` when the generation prompt is not the start of the rendered reply.

    The example is what the model sees at inference, the generation prompt, followed by the reply it
    must write there. A probe reply locates where the template starts writing the reply (the head);
    the reply is what the render holds after the head. The prompt must end where the head ends:

    - It may hold the head as it is, or the head with text inserted before its end: the template
      renders the earlier conversation differently when it ends with a question (Mistral Nemo writes
      the system prompt into the last question only, so no finished turn shows it).
    - After the head it may add an empty, closed reasoning block (the thinking mode is off: R1-Qwen's
      ``<think>\n\n</think>\n\n``, Gemma 4's ``<|channel>thought\n<channel|>``); the reply is then what
      the template writes for the message. Or it may open a think block (R1), which the model fills
      with its reasoning: the reply is the message's own ``<think>`` block and answer (without the
      opening the prompt already holds) followed by what the template writes after a reply.

    Anything else is an error naming the row: the reply cannot be placed after the prompt faithfully.
    """
    thinking = has_reasoning(messages[k]["content"])
    probe = template.render([*messages[:k], {"role": "assistant", "content": _PROBE}], thinking=thinking)
    at = probe.find(_PROBE)
    head = probe[:at] if at >= 0 and text.startswith(probe[:at]) else None
    added = _added_after(prompt, head) if head is not None else None
    origin = f"{where}: " if where else ""
    if head is not None and added is not None and (added == "" or _CLOSED_THINK.fullmatch(added)):
        return prompt + text[len(head) :]
    opened = _OPENS_THINK.fullmatch(added) if added is not None else None
    if opened is None:
        raise LoratuiError(
            f"{origin}the {template.name} chat template renders the conversation before assistant message {k} "
            "with a generation prompt that is not how it renders that message, so the reply cannot be located",
            hint="Choose a named template with data.template (chatml, alpaca, llama2, phi).",
        )
    content = messages[k]["content"]
    tag = _OPENING_TAG.match(content)
    if tag is None:
        raise LoratuiError(
            f"{origin}the {template.name} chat template opens a think block for every reply ({added!r}), "
            f"but assistant message {k} has no reasoning, so there is nothing faithful to train after it",
            hint="Start each assistant message with its reasoning, as '<think>...</think>' before the answer, "
            "or choose a template without a thinking mode with data.template.",
        )
    reply = content[tag.end() :]
    space = opened.group(1)  # the prompt's own whitespace after <think> stands for the message's
    reply = reply[len(space) :] if reply.startswith(space) else reply.lstrip()
    return prompt + reply + probe[at + len(_PROBE) :]


def _added_after(prompt: str, head: str) -> str | None:
    """What ``prompt`` holds after the end of ``head``, the render up to where a reply starts.

    The prompt starts with the head, or is the head with text inserted before its end (everything of
    the head after the first difference comes back, in one piece, later in the prompt); else None.
    """
    if prompt.startswith(head):
        return prompt[len(head) :]
    same = len(os.path.commonprefix([prompt, head]))
    rest = head[same:]
    found = prompt.rfind(rest)
    return prompt[found + len(rest) :] if found >= same else None


def render_examples(
    messages: list[dict[str, str]], template: ChatTemplate, eos: str, train_on_prompt: bool, where: str = ""
) -> list[Rendered]:
    """A chat row's examples: one (:func:`render_chat`) or, when its template rewrites earlier turns,
    one per assistant turn (:func:`render_turn`). With ``train_on_prompt`` the latter is only the last
    turn's, the whole conversation trained in full. Template errors name the row (``where``)."""
    from jinja2 import TemplateError

    try:
        try:
            return [(*render_chat(messages, template, eos, train_on_prompt), len(messages))]
        except RewritesEarlierTurns:
            pass
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        return [
            (*render_turn(messages, k, template, eos, train_on_prompt, where), k + 1)
            for k in (turns[-1:] if train_on_prompt else turns)
        ]
    except TemplateError as e:
        raise LoratuiError(
            f"{where + ': ' if where else ''}the {template.name} chat template cannot render this conversation: {e}"
        ) from None


_SLOT = re.compile("\x00(\\d+)\x00")


class ShapeRenderer:
    """Renders chats by filling placeholders into one Jinja render per role sequence.

    Used only for templates that copy contents verbatim (``content_is_opaque``); a row whose content
    holds the EOS text or a NUL character, whose reasoning the template takes in another way
    (:meth:`ChatTemplate.adapts`), or whose shape the template renders inconsistently takes the
    reference path. Output is identical to :func:`render_examples` (tested).
    """

    def __init__(self, template: ChatTemplate, eos: str, train_on_prompt: bool):
        self.template, self.eos, self.train_on_prompt = template, eos, train_on_prompt
        self._shapes: dict[tuple[str, ...], tuple[list[str | int], Spans] | None] = {}

    def _shape(self, roles: tuple[str, ...]) -> tuple[list[str | int], Spans] | None:
        if roles not in self._shapes:
            probe = [{"role": r, "content": f"\x00{i}\x00"} for i, r in enumerate(roles)]
            try:
                full, spans = render_chat(probe, self.template, self.eos, self.train_on_prompt)
            except RewritesEarlierTurns:
                self._shapes[roles] = None
                return None
            pieces: list[str | int] = []
            for i, part in enumerate(_SLOT.split(full)):
                pieces.append(int(part) if i % 2 else part)
            self._shapes[roles] = (pieces, spans)
        return self._shapes[roles]

    def __call__(self, messages: list[dict[str, str]], where: str = "") -> list[Rendered]:
        contents = [m["content"] for m in messages]
        shape = None
        if not (any(self.eos and self.eos in c or "\x00" in c for c in contents) or self.template.adapts(messages)):
            shape = self._shape(tuple(m["role"] for m in messages))
        if shape is None:
            return render_examples(messages, self.template, self.eos, self.train_on_prompt, where)
        pieces, spans = shape
        # probe position p -> real position: add the growth of every slot that ends before p
        out, probe_pos, shift, moved = [], 0, 0, []
        for piece in pieces:
            if isinstance(piece, int):
                text = contents[piece]
                placeholder = len(str(piece)) + 2
                probe_pos += placeholder
                shift += len(text) - placeholder
                moved.append((probe_pos, shift))
            else:
                text = piece
                probe_pos += len(piece)
            out.append(text)

        def real(p: int) -> int:
            delta = 0
            for end, total in moved:
                if end > p:
                    break
                delta = total
            return p + delta

        return [("".join(out), [(real(a), real(b)) for a, b in spans], len(messages))]


def clean_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer without any truncation or padding stored in tokenizer.json."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(backend.to_str())
    clean.no_truncation()
    clean.no_padding()
    return clean


def _tokenize(backend: Any, texts: list[str]) -> tuple[Any, Any, Any]:
    """Token counts, ids and start offsets (flat) of ``texts``."""
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
    flat_offsets = itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings))
    starts = np.fromiter(flat_offsets, dtype=np.int64, count=2 * total)[::2]
    return lengths, ids, starts


def _where(source: str) -> str:
    """``file:row`` (the ``source`` column) as errors name a row: ``file, row N``."""
    file, _, row = source.rpartition(":")
    return f"{file}, row {row}"


@dataclass
class _Examples:
    """The rendered examples of a batch, column by column."""

    texts: list[str] = field(default_factory=list)
    spans: list[Spans] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)  # example -> its row in the batch
    messages: list[str] = field(default_factory=list)  # example -> its messages column
    chunk: list[int] = field(default_factory=list)  # example -> chunk (for chats split per turn: turns after it)

    def add_row(self, row: int, messages_json: str, text: str, source: str, render: Render, eos: str) -> None:
        """The examples of one batch row: a chat through ``render``, a text with EOS appended, all trained."""
        if not messages_json:
            self.texts.append(text + eos)
            self.spans.append([(0, len(self.texts[-1]))])
            self.messages.append(messages_json)
            self.chunk.append(0)
            self.origin.append(row)
            return
        messages = json.loads(messages_json)
        examples = render(messages, _where(source))
        for j, (full, sp, held) in enumerate(examples):
            self.texts.append(full)
            self.spans.append(sp)
            self.messages.append(
                messages_json if held == len(messages) else json.dumps(messages[:held], ensure_ascii=False)
            )
            self.chunk.append(len(examples) - 1 - j)
            self.origin.append(row)


def _renderer(template: ChatTemplate, eos: str, train_on_prompt: bool) -> Render:
    if content_is_opaque(template.source):
        return ShapeRenderer(template, eos, train_on_prompt)

    def render(messages: list[dict[str, str]], where: str) -> list[Rendered]:
        return render_examples(messages, template, eos, train_on_prompt, where)

    return render


def _render_and_tokenize(
    batch: dict[str, list[Any]], backend: Any, render: Render, eos: str
) -> tuple[_Examples, Any, Any, Any]:
    """The batch's examples with their token counts, flat ids and flat start offsets.

    Renders chunk i+1 while the Rust tokenizer (which releases the GIL) encodes chunk i.
    """
    examples = _Examples()
    pending = []
    submitted = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for i, (messages_json, text) in enumerate(zip(batch["messages"], batch["text"])):
            examples.add_row(i, messages_json, text, batch["source"][i], render, eos)
            while len(examples.texts) - submitted >= PIPELINE_ROWS:
                pending.append(pool.submit(_tokenize, backend, examples.texts[submitted : submitted + PIPELINE_ROWS]))
                submitted += PIPELINE_ROWS
        if len(examples.texts) > submitted:
            pending.append(pool.submit(_tokenize, backend, examples.texts[submitted:]))
        chunks = [future.result() for future in pending]
    empty = np.zeros(0, dtype=np.int64)
    lengths, ids, starts = (np.concatenate([c[k] for c in chunks]) if chunks else empty for k in range(3))
    return examples, lengths, ids, starts


def _trained(starts: Any, lengths: Any, spans: list[Spans]) -> Any:
    """Per token: whether it starts inside one of its example's spans."""
    n = len(spans)
    row = np.repeat(np.arange(n), lengths)
    trained = np.zeros(len(starts), dtype=bool)
    for j in range(max((len(sp) for sp in spans), default=0)):  # one pass per assistant turn
        a = np.fromiter((sp[j][0] if j < len(sp) else 0 for sp in spans), dtype=np.int64, count=n)
        b = np.fromiter((sp[j][1] if j < len(sp) else 0 for sp in spans), dtype=np.int64, count=n)
        trained |= (starts >= a[row]) & (starts < b[row])
    return trained


def _windows(
    examples: _Examples, bounds: Any, documents: list[bool], chunk_tokens: int, chunk_overlap: int
) -> list[tuple[int, int, int, int]]:
    """(example, start, end, chunk) in flat token coordinates: one per example, several per long document."""
    windows: list[tuple[int, int, int, int]] = []
    for i in range(len(examples.texts)):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if documents[examples.origin[i]] and hi - lo > chunk_tokens:
            step = max(1, chunk_tokens - chunk_overlap)
            for w, s in enumerate(range(lo, hi - chunk_overlap, step)):
                windows.append((i, s, min(s + chunk_tokens, hi), w))
        else:
            windows.append((i, lo, hi, examples.chunk[i]))
    return windows


def _cut_windows(
    ids: Any, labels: Any, windows: list[tuple[int, int, int, int]], chunk_overlap: int
) -> tuple[Any, Any, Any]:
    """Flat ids, labels and row bounds of the windows; a later window's overlap is context, trained before."""
    pieces_ids, pieces_labels = [], []
    for _, lo, hi, w in windows:
        pieces_ids.append(ids[lo:hi])
        window_labels = labels[lo:hi].copy()
        if w > 0:
            window_labels[: min(chunk_overlap, hi - lo)] = IGNORE  # context: trained in the window before
        pieces_labels.append(window_labels)
    bounds = np.concatenate([[0], np.cumsum([hi - lo for _, lo, hi, _ in windows])])
    return np.concatenate(pieces_ids), np.concatenate(pieces_labels), bounds


def encode_batch(
    batch: dict[str, list[Any]],
    backend: Any,
    eos: str,
    template: ChatTemplate,
    train_on_prompt: bool,
    chunk_tokens: int,
    chunk_overlap: int,
) -> Any:
    """``datasets.map`` function: rows with ``messages``/``text`` -> a table of input_ids, labels, ...

    Vectorized over the batch: one call into the Rust tokenizer, masks from the token offsets with
    numpy, list columns built straight from flat arrays. Documents (``document`` true) are split into
    windows of ``chunk_tokens`` with ``chunk_overlap`` tokens of context; overlapping tokens are
    trained once (in the earlier window). A chat row whose template rewrites earlier turns becomes one
    example per assistant turn (:func:`render_examples`), each with the messages it holds.
    """
    import pyarrow as pa

    render = _renderer(template, eos, train_on_prompt)
    examples, lengths, ids, starts = _render_and_tokenize(batch, backend, render, eos)
    labels = np.where(_trained(starts, lengths, examples.spans), ids, IGNORE)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    windows = _windows(examples, bounds, batch["document"], chunk_tokens, chunk_overlap)
    if len(windows) != len(examples.texts):
        ids, labels, bounds = _cut_windows(ids, labels, windows, chunk_overlap)
    offsets = pa.array(bounds.astype(np.int32))
    examples_of = [i for i, *_ in windows]
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.astype(np.int32))),
            "source": [batch["source"][examples.origin[i]] for i in examples_of],
            "messages": [examples.messages[i] for i in examples_of],
            "meta": [batch["meta"][examples.origin[i]] for i in examples_of],
            "chunk": [w for *_, w in windows],
        }
    )


def per_turn_counts(ds: Any) -> tuple[int, int]:
    """(chat rows split into one example per assistant turn, the examples they became) in ``ds``.

    Read from the columns :func:`encode_batch` writes: the earlier turns of a split row are the chat
    examples with ``chunk`` > 0, and each split row has exactly one with ``chunk`` 1.
    """
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    chat = pc.not_equal(table.column("messages"), "")
    chunk = table.column("chunk")
    rows = pc.sum(pc.and_(chat, pc.equal(chunk, 1))).as_py() or 0
    earlier = pc.sum(pc.and_(chat, pc.greater(chunk, 0))).as_py() or 0
    return rows, rows + earlier


def seq2seq_texts(messages: list[dict[str, str]]) -> tuple[str, str]:
    """A validated chat -> (source, target) for an encoder-decoder model.

    The target is the last assistant message. The source is, for one question and its answer, the
    system prompt (if any) and the question joined by a blank line; for a longer conversation, every
    message before the last answer as ``role: content`` lines.
    """
    *context, last = messages
    if last["role"] != "assistant":  # guaranteed by formats._check_turns
        raise ValueError("the last message of a seq2seq example must be the assistant's answer")
    if sum(m["role"] != "system" for m in context) == 1:
        source = "\n\n".join(m["content"] for m in context)
    else:
        source = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    return source, last["content"]


def _token_ids(backend: Any, texts: list[str]) -> tuple[Any, Any]:
    """Token counts and flat ids of ``texts``, with the tokenizer's own special tokens (post-processor)."""
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=int(lengths.sum()))
    return lengths, ids


def _list_array(lengths: Any, ids: Any) -> Any:
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32)))


def encode_seq2seq_batch(batch: dict[str, list[Any]], backend: Any, eos_id: int) -> Any:
    """``datasets.map`` function for encoder-decoder models: rows -> input_ids (the source), labels (the target).

    Both are tokenized as the tokenizer does by itself (T5 and PEGASUS append ``</s>`` to each); the
    labels get EOS appended when the tokenizer did not end them with it. No label is -100: every
    target token is trained. Same columns as :func:`encode_batch`, ``chunk`` always 0.
    """
    import pyarrow as pa

    sources, targets = [], []
    for messages_json, origin in zip(batch["messages"], batch["source"]):
        if not messages_json:  # read_examples rejects text files first; this guards direct callers
            file, _, row = origin.rpartition(":")
            raise LoratuiError(
                f"{file}, row {row}: a text example cannot train an encoder-decoder (seq2seq) model",
                hint="Each row needs a source and a target: question/answer, instruction/output "
                "or a chat whose last message is the assistant's answer.",
            )
        source, target = seq2seq_texts(json.loads(messages_json))
        sources.append(source)
        targets.append(target)
    source_lengths, source_ids = _token_ids(backend, sources)
    target_lengths, target_ids = _token_ids(backend, targets)
    n = len(sources)
    ends = np.cumsum(target_lengths)
    last = target_ids[np.maximum(ends - 1, 0)] if len(target_ids) else np.full(n, -1)
    no_eos = (target_lengths == 0) | (last != eos_id)
    if no_eos.any():  # EOS at the end of each such row (np.insert puts it before the next row's first id)
        target_ids = np.insert(target_ids, ends[no_eos], eos_id)
        target_lengths = target_lengths + no_eos
    return pa.table(
        {
            "input_ids": _list_array(source_lengths, source_ids),
            "labels": _list_array(target_lengths, target_ids),
            "source": list(batch["source"]),
            "messages": list(batch["messages"]),
            "meta": list(batch["meta"]),
            "chunk": [0] * n,
        }
    )


def token_counts(ds: Any) -> tuple[Any, Any]:
    """Per row: the number of tokens and of trained tokens, straight from the Arrow columns.

    For a seq2seq dataset that is the source length and the target length (every target token is trained).
    """
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # respects select()/filter() indices
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    labels = table.column("labels").combine_chunks()
    flat = labels.flatten().to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    trained = np.bincount(parents, weights=(flat != IGNORE), minlength=len(lengths)).astype(np.int64)
    return lengths.astype(np.int64), trained
