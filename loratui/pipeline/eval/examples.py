"""Evaluation rows: the examples of a processed data split, the sets they form, and the tokens that end a reply.

Used by the eval step and by the exporters' checks against the merged model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import DataSection
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.eval.runtimes import IGNORE, Example
from loratui.pipeline.events import EventSink


@dataclass
class EvalSet:
    """The rows of one dataset split to score."""

    name: str  # "main" for the run's own data, else the earlier dataset's source
    source: str
    split: str
    examples: list[Example]
    preference: str = "none"  # the manifest's: none | paired | unpaired


PREFERENCE_COLUMNS = {
    "paired": ("rejected_input_ids", "rejected_labels", "rejected"),
    "unpaired": ("preference_label",),
}


def load_examples(
    split_dir: Path,
    task: str,
    tokenizer: Any,
    template: Any,
    fact_field: str,
    limit: int | None,
    preference: str = "none",
) -> list[Example]:
    """Evaluation rows from a processed split of the data step.

    Loss is scored on the tokens exactly as trained. A chat row whose last message is the assistant's
    is also a generation prompt: the conversation before that reply, rendered with the same chat
    template and ``add_generation_prompt`` (causal), or the encoder input (seq2seq). Raw text rows
    and document chunks are scored for loss only.

    Preference rows (``preference`` from the manifest): ``input_ids``/``labels`` hold the prompt and the chosen
    reply (paired) or the completion (unpaired), so loss and the generation references are the chosen
    replies'; a paired row's ``rejected`` is the prompt + rejected reply as trained, an unpaired row carries its
    label, and a bad (label 0) completion is no reference for the generation metrics (its text stays in
    ``extra["completion"]``).
    """
    from datasets import load_from_disk

    from loratui.pipeline.data.encode import clean_backend, seq2seq_texts

    ds = load_from_disk(str(split_dir))
    missing = [c for c in PREFERENCE_COLUMNS.get(preference, ()) if c not in ds.column_names]
    if missing:
        raise LoratuiError(
            f"{split_dir}: the data manifest says {preference} preference rows, but the split has no "
            f"{', '.join(missing)} column",
            hint="Run `loratui data --config <file>` again to rebuild the processed data.",
        )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    backend = clean_backend(tokenizer) if task == "causal" else None
    out: list[Example] = []
    for row in ds:
        messages = json.loads(row["messages"]) if row.get("messages") else []
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        fact = meta.get(fact_field) if isinstance(meta, dict) else None
        e = Example(
            input_ids=list(row["input_ids"]),
            labels=list(row["labels"]),
            source=row.get("source") or "",
            fact=str(fact) if fact not in (None, "") else None,
        )
        if messages and messages[-1]["role"] == "assistant" and not row.get("chunk"):
            e.reference = messages[-1]["content"]
            if task == "seq2seq":
                e.prompt, _ = seq2seq_texts(messages)
                e.prompt_ids = list(row["input_ids"])
            else:
                text = template.reply_prompt(messages)
                assert backend is not None  # a causal model's tokenizer
                e.prompt_ids = backend.encode(text, add_special_tokens=False).ids
                e.prompt = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), text)
        if preference != "none":
            _preference_fields(e, row, preference)
        out.append(e)
    return out


def _preference_fields(e: Example, row: dict[str, Any], preference: str) -> None:
    """The rejected side (paired) or the label (unpaired) of a preference row, into ``e``."""
    if preference == "paired":
        e.rejected = Example(
            input_ids=list(row["rejected_input_ids"]),
            labels=list(row["rejected_labels"]),
            reference=row["rejected"],
            source=e.source,
        )
    else:
        e.preference_label = int(bool(row["preference_label"]))
        e.extra["completion"] = e.reference
        if not e.preference_label:  # a bad completion is no reference for the generation metrics
            e.reference = None


def stop_ids(tokenizer: Any, sets: list[EvalSet]) -> set[int]:
    """Tokens that end a reply: EOS and every special token inside the trained replies.

    The data step ends an assistant turn with the template's end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``) and EOS where the two differ; a base model that never learned the pair must stop
    at the first of them, not write further turns until ``max_new_tokens``.
    """
    stop = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    for s in sets:
        for e in s.examples:
            if e.reference is not None:
                stop |= {int(t) for t in e.labels if t != IGNORE and t in special}
    return stop


def pick_split(manifest: dict[str, Any], want: str, where: str, events: EventSink, fallback_train: bool) -> str:
    splits = manifest["splits"]
    order = [want, "validation" if want == "test" else "test"] + (["train"] if fallback_train else [])
    for split in order:
        if split in splits:
            if split != want:
                events.log(f"{where}: no {want} split, scoring the {split} split instead", level="warning")
            return split
    raise LoratuiError(
        f"{where}: the data has no test or validation split to evaluate on",
        hint="Set data.test_ratio (for example 0.1) or data.test_source, then run the step again.",
    )


def source_label(source: Any) -> str:
    """A data source as one line: a list of files comma-separated."""
    return ", ".join(source) if isinstance(source, list) else str(source)


def split_source(data: DataSection, split: str) -> str:
    """Where the rows of ``split`` come from: ``data.test_source`` / ``data.val_source`` when they name their own
    files, else ``data.source`` (the split is held out from it, or shipped with a bundled dataset)."""
    own = {"test": data.test_source, "validation": data.val_source}.get(split)
    return source_label(own) if own else source_label(data.source)
