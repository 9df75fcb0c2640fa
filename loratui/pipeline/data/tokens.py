"""Examples -> token datasets in shards, and the max_length that bounds them.

:func:`encode_examples` runs :mod:`loratui.pipeline.data.encode`'s batch functions over ``datasets``
shards (in worker processes for big inputs); :func:`resolve_max_length` and
:func:`apply_length_policy` then fit the rows to ``data.max_length``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.encode import clean_backend, encode_batch, encode_seq2seq_batch, token_counts
from loratui.pipeline.data.formats import Example
from loratui.pipeline.data.pairs import apply_pair_length_policy, encode_pair_batch, encode_unpaired_batch
from loratui.pipeline.data.problems import RowProblem
from loratui.pipeline.data.read import BuildFindings, note_problem, problem_policy
from loratui.pipeline.data.templates import ChatTemplate
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.models import Task
from loratui.pipeline.steps import ShouldStop

MAX_AUTO_LENGTH = 4096
ENCODE_SHARD = 5000  # rows per encode call: progress and cancel checks between shards
PARALLEL_ROWS = 20_000  # from this many rows, tokenize in worker processes


def _to_dataset(examples: list[Example]) -> Any:
    from datasets import Dataset

    columns: dict[str, list[Any]] = {
        "messages": [json.dumps(ex.messages, ensure_ascii=False) if ex.messages is not None else "" for ex in examples],
        "text": [ex.text or "" for ex in examples],
        "document": [ex.document for ex in examples],
        "source": [f"{ex.file}:{ex.row}" for ex in examples],
        "meta": [json.dumps(ex.meta, ensure_ascii=False) if ex.meta else "" for ex in examples],
    }
    kind = examples[0].preference if examples else "none"
    if kind == "paired":
        columns["rejected"] = [json.dumps(ex.rejected, ensure_ascii=False) for ex in examples]
    elif kind == "unpaired":
        columns["label"] = [int(bool(ex.label)) for ex in examples]
    return Dataset.from_dict(columns)


def _workers(rows: int, num_proc: int | None) -> int | None:
    """Worker processes for tokenizing. The Rust tokenizer's own threads scale poorly (about 1.3x on
    2 cores, bench/data_prep.py), so big datasets get one process per core (up to 4), each rendering
    and tokenizing its share; small ones stay in-process, where start-up would cost more."""
    if num_proc is not None:
        return num_proc if num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 4) if rows >= PARALLEL_ROWS and cores > 1 else None


def encode_examples(
    examples: list[Example],
    tokenizer: Any,
    template: ChatTemplate | None,
    cfg: RunConfig,
    events: EventSink,
    should_stop: ShouldStop,
    split: str,
    num_proc: int | None = None,
    task: Task = "causal",
) -> Any:
    """Tokenize ``examples`` in shards (progress and cancel checks between them); None when there are none.

    ``template`` is the chat template for a causal model and is not used for seq2seq.
    """
    from datasets import concatenate_datasets, disable_progress_bars

    disable_progress_bars()
    workers = _workers(len(examples), num_proc)
    if workers:  # the Rust tokenizer must not use threads in forked workers (it would warn, then serialize)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encode, fn_kwargs = _encoder(examples, tokenizer, template, cfg, task)
    shard_rows = ENCODE_SHARD * workers * 10 if workers else ENCODE_SHARD
    parts = []
    for start in range(0, len(examples), shard_rows):
        if should_stop():
            raise StepCancelled("cancelled while tokenizing")
        shard = _to_dataset(examples[start : start + shard_rows])
        parts.append(
            shard.map(
                encode,
                batched=True,
                batch_size=ENCODE_SHARD,
                fn_kwargs=fn_kwargs,
                remove_columns=shard.column_names,
                num_proc=workers,
                load_from_cache_file=False,
                keep_in_memory=True,
            )
        )
        events.progress(min(start + shard_rows, len(examples)), len(examples), task=f"tokenize {split}", unit="rows")
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _encoder(
    examples: list[Example], tokenizer: Any, template: ChatTemplate | None, cfg: RunConfig, task: Task
) -> tuple[Any, dict[str, Any]]:
    """The batch function for ``examples`` (seq2seq, preference pairs, unpaired preference or chats) and its
    arguments."""
    d = cfg.data
    if task == "seq2seq":
        if tokenizer.eos_token_id is None:
            raise LoratuiError(
                f"{tokenizer.name_or_path}: the tokenizer has no EOS token, which a seq2seq target must end with",
                hint="Set eos_token in the model's tokenizer_config.json.",
            )
        return encode_seq2seq_batch, dict(backend=clean_backend(tokenizer), eos_id=tokenizer.eos_token_id)
    kind = examples[0].preference if examples else "none"
    common: dict[str, Any] = dict(backend=clean_backend(tokenizer), eos=tokenizer.eos_token or "", template=template)
    if kind != "none":  # only the last reply is trained; train_on_prompt does not apply
        return (encode_pair_batch if kind == "paired" else encode_unpaired_batch), common
    return encode_batch, common | dict(
        train_on_prompt=d.train_on_prompt,
        chunk_tokens=d.chunk_tokens,
        chunk_overlap=min(d.chunk_overlap, d.chunk_tokens - 1),
    )


def model_context(tokenizer: Any, model_dir: Path) -> int:
    """The longest input the model takes, as far as its tokenizer and config tell, at most MAX_AUTO_LENGTH."""
    limits = [MAX_AUTO_LENGTH]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    try:
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("max_position_embeddings"):
            limits.append(int(config["max_position_embeddings"]))
    except (OSError, ValueError):
        pass
    return min(limits)


def resolve_max_length(cfg: RunConfig, lengths: list[int], context: int) -> int:
    """``data.max_length``, or for ``auto`` the longest of ``lengths`` rounded up to 64, capped by ``context``."""
    if cfg.data.max_length != "auto":
        return int(cfg.data.max_length)
    longest = max(lengths) if lengths else 64
    return min(context, -(-longest // 64) * 64)


def apply_length_policy(ds: Any, max_length: int, cfg: RunConfig, out: BuildFindings, task: Task = "causal") -> Any:
    """Truncate or drop over-long rows (and rows with nothing left to train) per data.on_problem.

    For seq2seq, ``max_length`` bounds the source (input_ids) and the target (labels) each; for preference
    pairs, the chosen and the rejected sequence each (:func:`.pairs.apply_pair_length_policy`).
    """
    import numpy as np

    if "rejected_input_ids" in ds.column_names:
        return apply_pair_length_policy(ds, max_length, cfg, out)
    lengths, targets = token_counts(ds)
    policy = problem_policy(cfg, "too_long")
    too_long = (lengths > max_length) | (targets > max_length) if task == "seq2seq" else lengths > max_length
    over = np.nonzero(too_long)[0].tolist()
    sources = ds["source"][:] if over else []
    drop: set[int] = set()
    for i in over:
        file, _, row = sources[i].rpartition(":")
        message = _too_long_message(int(lengths[i]), int(targets[i]), max_length, task)
        if policy == "truncate":
            out.problems.append(
                RowProblem("too_long", file, int(row), message + f": truncated to {max_length}", action="truncated")
            )
        else:
            note_problem(cfg, out, RowProblem("too_long", file, int(row), message))
            drop.add(i)
    if over and policy == "truncate":
        ds = ds.map(
            lambda r: {"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]},
            load_from_cache_file=False,
            keep_in_memory=True,
        )
    drop |= _untrained(ds, drop, cfg, out)
    if drop:
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return ds


def _too_long_message(length: int, target: int, max_length: int, task: Task) -> str:
    if task != "seq2seq":
        return f"{length} tokens, more than max_length {max_length}"
    parts = [f"{what} {n} tokens" for what, n in (("source", length), ("target", target)) if n > max_length]
    return f"{' and '.join(parts)}, more than max_length {max_length}"


def _untrained(ds: Any, dropped: set[int], cfg: RunConfig, out: BuildFindings) -> set[int]:
    """The rows of ``ds`` not yet ``dropped`` that have no trained token left, each noted as a problem."""
    import numpy as np

    _, trained = token_counts(ds)
    empty = [i for i in np.nonzero(trained == 0)[0].tolist() if i not in dropped]
    sources = ds["source"][:] if empty else []
    for i in empty:
        file, _, row = sources[i].rpartition(":")
        message = "no assistant tokens left to train on (the answer was cut off)"
        note_problem(cfg, out, RowProblem("no_trained_tokens", file, int(row), message))
    return set(empty)
