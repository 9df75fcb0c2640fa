"""Examples -> token ids and labels, with the loss mask on assistant turns.

Causal (decoder-only) models: a chat is rendered through its chat template with the character spans
of its assistant turns (:mod:`.render`, which also explains templates that rewrite earlier turns).
The whole text is then tokenized once with offsets, and a token is trained when it starts inside an
assistant span. Plain text is trained whole, EOS appended; a document is cut into token windows.

Encoder-decoder (seq2seq) models: an example is a source text for the encoder and a target for the
decoder (:func:`seq2seq_texts`, :func:`encode_seq2seq_batch`); ``labels`` are the target's ids, EOS
last, all trained, and no chat template is involved.
"""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loratui.pipeline.data.render import Render, Rendered, ShapeRenderer, Spans, render_examples
from loratui.pipeline.data.templates import ChatTemplate, content_is_opaque
from loratui.pipeline.errors import LoratuiError

IGNORE = -100
PIPELINE_ROWS = 250  # rendered examples per tokenizer call inside a batch


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


def token_counts(ds: Any, prefix: str = "") -> tuple[Any, Any]:
    """Per row: the number of tokens and of trained tokens, straight from the Arrow columns.

    For a seq2seq dataset that is the source length and the target length (every target token is trained).
    ``prefix`` "rejected_": the rejected sequences of a preference dataset.
    """
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # respects select()/filter() indices
    lengths = pc.list_value_length(table.column(f"{prefix}input_ids")).to_numpy(zero_copy_only=False)
    labels = table.column(f"{prefix}labels").combine_chunks()
    flat = labels.flatten().to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    trained = np.bincount(parents, weights=(flat != IGNORE), minlength=len(lengths)).astype(np.int64)
    return lengths.astype(np.int64), trained
