"""Examples -> token ids and labels, with the loss mask on assistant turns.

A chat is rendered once through its chat template. The span of each assistant turn is found by
rendering the conversation up to that turn with the generation prompt (what the model sees before
answering) and up to the end of that turn: the difference is exactly what the model must produce,
including the template's end-of-turn token. The whole text is then tokenized once with offsets, and
a token is trained when it starts inside an assistant span. If the template does not end the last
answer with EOS, EOS is appended and trained, so the model learns to stop.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from loratui.pipeline.data.templates import ChatTemplate
from loratui.pipeline.errors import LoratuiError

IGNORE = -100


def render_chat(messages: list[dict[str, str]], template: ChatTemplate, eos: str,
                train_on_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans to train on."""
    full = template.render(messages)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True)
        upto = full if k == len(messages) - 1 else template.render(messages[: k + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise LoratuiError(
                f"the {template.name} chat template renders a conversation differently from its own prefixes, "
                "so the assistant turns cannot be located",
                hint="Choose a named template with data.template (chatml, alpaca, llama2, phi).")
        start = len(before)
        spans.append((start, start + len(upto[start:].rstrip())))  # not the newline after end-of-turn
    if eos and spans and eos not in full[spans[-1][0]:spans[-1][1]]:
        full += eos
        spans[-1] = (spans[-1][0], len(full))
    if train_on_prompt:
        spans = [(0, len(full))]
    return full, spans


def encode_batch(batch: dict[str, list[Any]], tokenizer: Any, template: ChatTemplate,
                 train_on_prompt: bool, chunk_tokens: int, chunk_overlap: int) -> dict[str, list[Any]]:
    """``datasets.map`` function: rows with ``messages``/``text`` JSON -> input_ids, labels.

    Documents (``document`` true) are split into windows of ``chunk_tokens`` with ``chunk_overlap``
    tokens of context; overlapping tokens are trained once (in the earlier window).
    """
    eos = tokenizer.eos_token or ""
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    for messages_json, text in zip(batch["messages"], batch["text"]):
        if messages_json:
            full, sp = render_chat(json.loads(messages_json), template, eos, train_on_prompt)
        else:
            full = text + eos
            sp = [(0, len(full))]
        texts.append(full)
        spans.append(sp)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "source": [], "messages": [], "meta": [],
                                 "chunk": []}
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids_arr = np.asarray(ids, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        trained = np.zeros(len(ids), dtype=bool)
        for a, b in spans[i]:
            trained |= (starts >= a) & (starts < b)
        labels = np.where(trained, ids_arr, IGNORE)
        windows = [(0, len(ids))]
        if batch["document"][i] and len(ids) > chunk_tokens:
            step = max(1, chunk_tokens - chunk_overlap)
            windows = [(s, min(s + chunk_tokens, len(ids))) for s in range(0, len(ids) - chunk_overlap, step)]
        for w, (a, b) in enumerate(windows):
            window_labels = labels[a:b].copy()
            if w > 0:
                window_labels[: min(chunk_overlap, b - a)] = IGNORE  # context only: trained in the window before
            out["input_ids"].append(ids_arr[a:b].tolist())
            out["labels"].append(window_labels.tolist())
            out["source"].append(batch["source"][i])
            out["messages"].append(batch["messages"][i])
            out["meta"].append(batch["meta"][i])
            out["chunk"].append(w)
    return out
