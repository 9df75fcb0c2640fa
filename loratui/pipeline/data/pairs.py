"""Preference examples -> token ids and labels (causal models), and max_length for pairs.

A preference row is rendered through the chat template like a chat (:mod:`.render`, :mod:`.encode`),
with one difference: only the FINAL assistant reply is trained (the assistant turns of a multi-turn
prompt are context) and ``data.train_on_prompt`` does not apply. A pair is rendered twice, the prompt
with the chosen reply and the prompt with the rejected one, and becomes one row:

- ``input_ids``, ``labels``: prompt + chosen reply; labels -100 except the reply's trained tokens (the
  reply and its end of turn, as SFT marks a reply);
- ``rejected_input_ids``, ``rejected_labels``: the same for prompt + rejected reply;
- ``rejected`` (the rejected reply's text), ``messages`` (the chosen conversation), ``source``, ``meta``,
  ``chunk`` (0).

Invariant: both sequences hold the same prompt tokens, ``input_ids[:p] == rejected_input_ids[:p]`` where
``p`` is the first trained position of each, and the reply starts at a token boundary. A pair that the
template renders otherwise (a prompt written differently before each reply, a token spanning the end of the
prompt and the start of the reply) is a ``prompt_boundary`` problem. An unpaired (KTO) row is ``input_ids``,
``labels`` and ``preference_label`` (1 desirable, 0 undesirable).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.encode import IGNORE, _Examples, _render_and_tokenize, _renderer, _trained, token_counts
from loratui.pipeline.data.problems import RowProblem
from loratui.pipeline.data.read import BuildFindings, note_problem, problem_policy
from loratui.pipeline.data.render import Render, Rendered
from loratui.pipeline.data.templates import ChatTemplate

PROBLEM = "problem"  # a column of the encoded pairs until note_encode_problems reads it
PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


def final_reply(render: Render) -> Render:
    """``render`` with only the conversation's last reply trained, in one example (the whole conversation)."""

    def final(messages: list[dict[str, str]], where: str) -> list[Rendered]:
        text, spans, held = render(messages, where)[-1]
        return [(text, spans[-1:], held)]

    return final


@dataclass
class _Side:
    """The encoded sequences of one side (chosen or rejected) of a batch: flat arrays and row bounds."""

    examples: _Examples
    ids: Any
    labels: Any
    starts: Any
    bounds: Any

    def row(self, i: int) -> tuple[Any, Any, Any]:
        lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
        return self.ids[lo:hi], self.labels[lo:hi], self.starts[lo:hi]

    def list_array(self, values: Any) -> Any:
        import pyarrow as pa

        offsets = pa.array(self.bounds.astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32)))


def _encode_side(messages: list[str], sources: list[str], backend: Any, render: Render, eos: str) -> _Side:
    batch = {"messages": messages, "text": [""] * len(messages), "source": sources}
    examples, lengths, ids, starts = _render_and_tokenize(batch, backend, render, eos)
    labels = np.where(_trained(starts, lengths, examples.spans), ids, IGNORE)
    return _Side(examples, ids, labels, starts, np.concatenate([[0], np.cumsum(lengths)]))


def _first_trained(labels: Any) -> int | None:
    found = np.flatnonzero(labels != IGNORE)
    return int(found[0]) if len(found) else None


def _boundary_problem(chosen: _Side, rejected: _Side, i: int) -> str:
    """Why pair ``i`` breaks the invariant (the same prompt tokens, the replies at a token boundary), or ""."""
    texts, starts, firsts = [], [], []
    for side in (chosen, rejected):
        text, start = side.examples.texts[i], side.examples.spans[i][0][0]
        texts.append(text)
        starts.append(start)
        firsts.append(_first_trained(side.row(i)[1]))
    c_prompt, r_prompt = (text[:start] for text, start in zip(texts, starts))
    if c_prompt != r_prompt:
        at = len(os.path.commonprefix([c_prompt, r_prompt]))
        return (
            "the chat template writes the prompt differently before the chosen and the rejected reply (from "
            f"character {at}: {c_prompt[at : at + 30]!r} before the chosen, {r_prompt[at : at + 30]!r} before the "
            "rejected), so the pair has no shared prompt"
        )
    for name, side, text, start, first in zip(("chosen", "rejected"), (chosen, rejected), texts, starts, firsts):
        token_starts = side.row(i)[2]
        if first is not None and int(token_starts[first]) != start:
            return (
                f"the {name} reply does not start at a token boundary: one token spans the end of the prompt and "
                f"the reply's start ({text[max(0, start - 12) : start]!r} + {text[start : start + 12]!r}); a reply "
                "that starts with whitespace or punctuation the prompt ends with can merge with it"
            )
    c_first, r_first = firsts
    if c_first is None or r_first is None:  # nothing trained on a side: no_trained_tokens, after max_length
        return ""
    same = np.array_equal(chosen.row(i)[0][:c_first], rejected.row(i)[0][:c_first])
    if c_first != r_first or not same:
        return (
            f"after tokenizing, the prompt is {c_first} tokens before the chosen reply and {r_first} before the "
            "rejected one, or those tokens differ: the pair has no shared prompt tokens"
        )
    return ""


def encode_pair_batch(batch: dict[str, list[Any]], backend: Any, eos: str, template: ChatTemplate) -> Any:
    """``datasets.map`` function: pairs (``messages`` the chosen conversation, ``rejected`` the rejected reply)
    -> the columns of the module docstring, plus ``problem`` (why a pair breaks the invariant, else "")."""
    import pyarrow as pa

    render = final_reply(_renderer(template, eos, False))
    sources = list(batch["source"])
    rejected_messages = [
        json.dumps([*json.loads(m)[:-1], *json.loads(r)], ensure_ascii=False)
        for m, r in zip(batch["messages"], batch["rejected"])
    ]
    chosen = _encode_side(list(batch["messages"]), sources, backend, render, eos)
    rejected = _encode_side(rejected_messages, sources, backend, render, eos)
    n = len(sources)
    return pa.table(
        {
            "input_ids": chosen.list_array(chosen.ids),
            "labels": chosen.list_array(chosen.labels),
            "rejected_input_ids": rejected.list_array(rejected.ids),
            "rejected_labels": rejected.list_array(rejected.labels),
            "rejected": [json.loads(r)[-1]["content"] for r in batch["rejected"]],
            "source": sources,
            "messages": list(batch["messages"]),
            "meta": list(batch["meta"]),
            "chunk": [0] * n,
            PROBLEM: [_boundary_problem(chosen, rejected, i) for i in range(n)],
        }
    )


def encode_unpaired_batch(batch: dict[str, list[Any]], backend: Any, eos: str, template: ChatTemplate) -> Any:
    """``datasets.map`` function: unpaired rows (``messages``, ``label`` 1 or 0) -> input_ids, labels (the
    last reply trained), preference_label, source, messages, meta, chunk."""
    import pyarrow as pa

    render = final_reply(_renderer(template, eos, False))
    sources = list(batch["source"])
    side = _encode_side(list(batch["messages"]), sources, backend, render, eos)
    return pa.table(
        {
            "input_ids": side.list_array(side.ids),
            "labels": side.list_array(side.labels),
            "preference_label": pa.array(batch["label"], type=pa.int8()),
            "source": sources,
            "messages": list(batch["messages"]),
            "meta": list(batch["meta"]),
            "chunk": [0] * len(sources),
        }
    )


def _where(source: str) -> tuple[str, int]:
    file, _, row = source.rpartition(":")
    return file, int(row)


def note_encode_problems(ds: Any, cfg: RunConfig, out: BuildFindings) -> Any:
    """Drop the pairs that broke the invariant while encoding, each noted as a ``prompt_boundary`` problem."""
    if ds is None or PROBLEM not in ds.column_names:
        return ds
    problems = ds[PROBLEM][:]
    bad = [i for i, p in enumerate(problems) if p]
    sources = ds["source"][:] if bad else []
    for i in bad:
        file, row = _where(sources[i])
        note_problem(cfg, out, RowProblem("prompt_boundary", file, row, problems[i]))
    if bad:
        ds = ds.select([i for i in range(len(ds)) if not problems[i]])
    return ds.remove_columns(PROBLEM)


def pair_lengths(ds: Any) -> tuple[Any, Any, Any, Any]:
    """Per pair: (chosen tokens, chosen trained, rejected tokens, rejected trained)."""
    chosen, chosen_trained = token_counts(ds)
    rejected, rejected_trained = token_counts(ds, "rejected_")
    return chosen, chosen_trained, rejected, rejected_trained


def apply_pair_length_policy(ds: Any, max_length: int, cfg: RunConfig, out: BuildFindings) -> Any:
    """Pairs with a side longer than ``max_length``: both sequences cut at max_length (keeping the start) or
    the pair dropped, per ``data.on_problem.too_long``; then pairs with a side that has nothing left to train."""
    chosen, _, rejected, _ = pair_lengths(ds)
    policy = problem_policy(cfg, "too_long")
    over = np.nonzero((chosen > max_length) | (rejected > max_length))[0].tolist()
    sources = ds["source"][:] if over else []
    drop: set[int] = set()
    for i in over:
        file, row = _where(sources[i])
        sides = [
            f"{name} {int(n)} tokens"
            for name, n in (("chosen", chosen[i]), ("rejected", rejected[i]))
            if n > max_length
        ]
        message = f"{' and '.join(sides)}, more than max_length {max_length}"
        if policy == "truncate":
            message += f": both sides truncated to {max_length}"
            out.problems.append(RowProblem("too_long", file, row, message, action="truncated"))
        else:
            note_problem(cfg, out, RowProblem("too_long", file, row, message))
            drop.add(i)
    if over and policy == "truncate":
        ds = ds.map(
            lambda r: {c: r[c][:max_length] for c in PAIR_COLUMNS},
            load_from_cache_file=False,
            keep_in_memory=True,
        )
    drop |= _untrained_pairs(ds, drop, cfg, out)
    if drop:
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return ds


def _untrained_pairs(ds: Any, dropped: set[int], cfg: RunConfig, out: BuildFindings) -> set[int]:
    _, chosen_trained, _, rejected_trained = pair_lengths(ds)
    empty = [i for i in np.nonzero((chosen_trained == 0) | (rejected_trained == 0))[0].tolist() if i not in dropped]
    sources = ds["source"][:] if empty else []
    for i in empty:
        file, row = _where(sources[i])
        sides = [name for name, n in (("chosen", chosen_trained[i]), ("rejected", rejected_trained[i])) if n == 0]
        message = f"no tokens of the {' and the '.join(sides)} reply left to train on (cut off by max_length)"
        note_problem(cfg, out, RowProblem("no_trained_tokens", file, row, message, field=sides[0]))
    return set(empty)
