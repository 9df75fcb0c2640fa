"""The data step: files -> validated examples -> templated, masked, split token datasets.

Writes ``runs/<name>/data/``:
  report.json, report.md   what was read, detected, dropped or truncated (row by row), split, tokenized
  preview.txt              examples through the template with the trained tokens marked, length stats
  dataset.json             manifest for later steps: task, splits, template, render_date, max_length, cache key
  processed/<split>/       ``datasets`` saved to disk: input_ids, labels, source, messages, meta

The task follows the model (:func:`model_task`): ``causal`` for decoder-only models (a chat through
its template, loss on the assistant turns) or ``seq2seq`` for encoder-decoder models such as T5,
FLAN-T5 and PEGASUS (``input_ids`` is the source text for the encoder, ``labels`` the target for the
decoder; no chat template; ``max_length`` applies to each of them; the report's ``tokens.<split>``
are source lengths and ``tokens.target.<split>`` target lengths).

The result is cached in ``$LORATUI_HOME/datasets/<key>`` under a key over the file contents, the
tokenizer, the template and the data settings; a second run with the same inputs only copies it.

``render_date`` (ISO, in dataset.json and, for templates that write the date, in the report): the
date a chat template that inserts "today" renders with. It is the day the data step first ran for
the run, read back from the run's dataset.json ever after (:func:`run_render_date`), so renders,
cache key and later steps do not change with the calendar. It enters the cache key only for
templates that write the date.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.encode import per_turn_counts, token_counts
from loratui.pipeline.data.formats import Example, apply_columns, detect_format, to_example
from loratui.pipeline.data.loaders import bundled_split, expand_sources, is_bundled, load_file
from loratui.pipeline.data.problems import DEFAULT_POLICY, PROBLEMS, RowError, RowProblem
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_dir, atomic_write_text, write_config
from loratui.pipeline.steps import ShouldStop, StepResult

# Bump when the processed output changes for the same inputs, so caches are rebuilt.
DATA_VERSION = 1
SPLITS = ("train", "validation", "test")
MAX_AUTO_LENGTH = 4096
ENCODE_SHARD = 5000  # rows per encode call: progress and cancel checks between shards
PARALLEL_ROWS = 20_000  # from this many rows, tokenize in worker processes
Task = Literal["causal", "seq2seq"]


@dataclass
class BuildFindings:
    """Everything the build learns, for the report."""

    files: list[dict[str, Any]] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    rows_read: int = 0


class NoTrainingData(LoratuiError):
    """Nothing is left to train on; carries what was found so the report can still be written."""

    def __init__(self, out: BuildFindings, why: str):
        counts = Counter(p.kind for p in out.problems)
        found = ", ".join(f"{kind} {n}" for kind, n in counts.most_common()) or "no rows"
        first = sorted(out.problems, key=lambda p: (p.file, p.row or 0))[:3]
        examples = "; ".join(f"{p} ({p.kind})" for p in first)
        names = [f["path"] for f in out.files if f["split"] == "train"]
        where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        super().__init__(
            f"no training examples are left {why} of {where}: {out.rows_read} rows read, "
            f"{len(out.problems)} dropped ({found})",
            hint=f"Every dropped row is listed in data/report.json. First: {examples}"
            if examples
            else "Check data.source.",
        )
        self.out = out


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def split_files(cfg: RunConfig) -> dict[str, list[Path]]:
    d = cfg.data
    files = {"train": expand_sources(d.source), "validation": [], "test": []}
    bundled = [d.source] if isinstance(d.source, str) and is_bundled(d.source) else []
    for split, own in (("validation", d.val_source), ("test", d.test_source)):
        if own:
            files[split] = expand_sources(own)
        elif bundled:  # bundled datasets ship their own held-out splits
            path = bundled_split(bundled[0], split)
            files[split] = [path] if path else []
    return files


def _policy(cfg: RunConfig, kind: str) -> str:
    return cfg.data.on_problem.get(kind, DEFAULT_POLICY[kind])  # type: ignore[call-overload]  # kind: a ProblemKind


def _note(cfg: RunConfig, out: BuildFindings, problem: RowProblem) -> None:
    if _policy(cfg, problem.kind) == "fail":
        raise LoratuiError(
            f"{problem} ({problem.kind})",
            hint=f"data.on_problem.{problem.kind} is 'fail'; set it to 'drop' to skip such rows.",
        )
    out.problems.append(problem)


def read_examples(
    cfg: RunConfig, files: list[Path], out: BuildFindings, split: str, task: Task = "causal"
) -> list[Example]:
    """Load, detect and validate; bad rows become problems (or stop the step under 'fail').

    A seq2seq model needs a source and a target per row: text files and documents are an error.
    """
    d = cfg.data
    examples: list[Example] = []
    for path in files:
        loaded = load_file(path)
        name = str(path)
        good: list[tuple[int, dict[str, Any]]] = []
        for number, record in loaded.rows:
            out.rows_read += 1
            if isinstance(record, RowError):
                _note(cfg, out, RowProblem(record.kind, name, number, record.message, record.field))
            else:
                good.append((number, apply_columns(record, d.columns)))
        info: dict[str, Any] = {"path": name, "split": split, "kind": loaded.kind, "rows": len(loaded.rows)}
        if loaded.kind == "document":
            fmt, reason = "text", "a document: chunked by tokens"
        elif d.format != "auto":
            fmt, reason = d.format, "set by data.format"
        elif not good:
            fmt, reason = "unknown", "no valid rows to detect the format from"
        else:
            detection = detect_format([r for _, r in good], name)
            fmt, reason = detection.format, detection.reason
        info.update(format=fmt, reason=reason)
        if task == "seq2seq" and fmt == "text":
            _reject_text_for_seq2seq(name, loaded.kind, reason)
        valid: list[Example] = []
        for number, record in good if fmt != "unknown" else []:
            try:
                ex = to_example(record, fmt, name, number, d.system_prompt)
            except RowError as e:
                _note(cfg, out, RowProblem(e.kind, name, number, e.message, e.field))
                continue
            ex.document = loaded.kind == "document"
            valid.append(ex)
        info["valid"] = len(valid)
        extra = sorted({k for ex in valid for k in ex.meta})
        if extra:
            info["extra_columns"] = extra
        out.files.append(info)
        examples += valid
    return examples


def _reject_text_for_seq2seq(name: str, kind: str, reason: str) -> None:
    what = "is a document" if kind == "document" else f"holds plain text rows ({reason})"
    raise LoratuiError(
        f"{name}: {what}, which cannot train an encoder-decoder (seq2seq) model: each example needs a "
        "source text (the encoder's input) and a target (what the decoder learns to write)",
        hint="Use rows with question/answer, prompt/completion, instruction/output (alpaca) or messages "
        "(chat; the last assistant message is the target), or choose a decoder-only model for plain text.",
    )


def _dedupe(
    cfg: RunConfig, examples: list[Example], seen: dict[str, str], out: BuildFindings, kind: str
) -> list[Example]:
    kept = []
    for ex in examples:
        k = ex.key()
        if k in seen:
            what = "an example in the training split" if kind == "duplicate_across_splits" else "an earlier row"
            _note(cfg, out, RowProblem(kind, ex.file, ex.row, f"same content as {what} ({seen[k]})"))
            continue
        seen.setdefault(k, f"{ex.file}, row {ex.row}")
        kept.append(ex)
    return kept


def split_examples(cfg: RunConfig, by_split: dict[str, list[Example]], out: BuildFindings) -> dict[str, list[Example]]:
    """Deterministic ratio split (unless files per split were given), deduplicated within and across."""
    d = cfg.data
    pool = by_split["train"]
    if d.dedupe:
        pool = _dedupe(cfg, pool, {}, out, "duplicate")
    rng = random.Random(d.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    splits: dict[str, list[Example]] = {"validation": [], "test": []}
    cut = 0
    for split, ratio in (("test", d.test_ratio), ("validation", d.val_ratio)):
        if by_split[split]:  # its own file(s): no ratio split
            continue
        n = round(len(pool) * ratio)
        if ratio > 0 and n == 0 and len(pool) >= 3:
            n = 1
        splits[split] = [pool[i] for i in sorted(order[cut : cut + n])]
        cut += n
    train = [pool[i] for i in sorted(order[cut:])]
    if not train:
        raise NoTrainingData(out, "after validation and splitting" if pool else "after validation")
    result = {"train": train}
    seen = {ex.key(): f"{ex.file}, row {ex.row}" for ex in train}
    for split in ("validation", "test"):
        rows = by_split[split] or splits[split]
        if d.dedupe and by_split[split]:
            rows = _dedupe(cfg, rows, {}, out, "duplicate")
        result[split] = _dedupe(cfg, rows, dict(seen), out, "duplicate_across_splits")
        seen.update({ex.key(): f"{ex.file}, row {ex.row}" for ex in result[split]})
    return result


# --------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------


def _to_dataset(examples: list[Example]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "messages": [
                json.dumps(ex.messages, ensure_ascii=False) if ex.messages is not None else "" for ex in examples
            ],
            "text": [ex.text or "" for ex in examples],
            "document": [ex.document for ex in examples],
            "source": [f"{ex.file}:{ex.row}" for ex in examples],
            "meta": [json.dumps(ex.meta, ensure_ascii=False) if ex.meta else "" for ex in examples],
        }
    )


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
    template: Any,
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

    from loratui.pipeline.data.encode import clean_backend, encode_batch, encode_seq2seq_batch

    disable_progress_bars()
    d = cfg.data
    workers = _workers(len(examples), num_proc)
    if workers:  # the Rust tokenizer must not use threads in forked workers (it would warn, then serialize)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if task == "seq2seq":
        if tokenizer.eos_token_id is None:
            raise LoratuiError(
                f"{tokenizer.name_or_path}: the tokenizer has no EOS token, which a seq2seq target must end with",
                hint="Set eos_token in the model's tokenizer_config.json.",
            )
        encode: Any = encode_seq2seq_batch
        fn_kwargs: dict[str, Any] = dict(backend=clean_backend(tokenizer), eos_id=tokenizer.eos_token_id)
    else:
        encode = encode_batch
        fn_kwargs = dict(
            backend=clean_backend(tokenizer),
            eos=tokenizer.eos_token or "",
            template=template,
            train_on_prompt=d.train_on_prompt,
            chunk_tokens=d.chunk_tokens,
            chunk_overlap=min(d.chunk_overlap, d.chunk_tokens - 1),
        )
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


def _model_context(tokenizer: Any, model_dir: Path) -> int:
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
    if cfg.data.max_length != "auto":
        return int(cfg.data.max_length)
    longest = max(lengths) if lengths else 64
    return min(context, -(-longest // 64) * 64)


def apply_length_policy(ds: Any, max_length: int, cfg: RunConfig, out: BuildFindings, task: Task = "causal") -> Any:
    """Truncate or drop over-long rows (and rows with nothing left to train) per data.on_problem.

    For seq2seq, ``max_length`` bounds the source (input_ids) and the target (labels) each.
    """
    import numpy as np

    from loratui.pipeline.data.encode import token_counts

    lengths, targets = token_counts(ds)
    policy = _policy(cfg, "too_long")
    too_long = (lengths > max_length) | (targets > max_length) if task == "seq2seq" else lengths > max_length
    over = np.nonzero(too_long)[0].tolist()
    sources = ds["source"][:] if over else []
    drop: set[int] = set()
    for i in over:
        file, _, row = sources[i].rpartition(":")
        if task == "seq2seq":
            parts = [
                f"{what} {n} tokens" for what, n in (("source", lengths[i]), ("target", targets[i])) if n > max_length
            ]
            message = f"{' and '.join(parts)}, more than max_length {max_length}"
        else:
            message = f"{lengths[i]} tokens, more than max_length {max_length}"
        if policy == "truncate":
            out.problems.append(
                RowProblem("too_long", file, int(row), message + f": truncated to {max_length}", action="truncated")
            )
        else:
            _note(cfg, out, RowProblem("too_long", file, int(row), message))
            drop.add(i)
    if over and policy == "truncate":
        ds = ds.map(
            lambda r: {"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]},
            load_from_cache_file=False,
            keep_in_memory=True,
        )
    _, trained = token_counts(ds)
    empty = [i for i in np.nonzero(trained == 0)[0].tolist() if i not in drop]
    if empty:
        sources = ds["source"][:]
    for i in empty:
        file, _, row = sources[i].rpartition(":")
        _note(
            cfg,
            out,
            RowProblem(
                "no_trained_tokens", file, int(row), "no assistant tokens left to train on (the answer was cut off)"
            ),
        )
        drop.add(i)
    if drop:
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return ds


# --------------------------------------------------------------------------------------------
# Report and preview
# --------------------------------------------------------------------------------------------


def _stats(lengths: Any) -> dict[str, Any]:
    import numpy as np

    a = np.asarray(lengths)
    if not a.size:
        return {"rows": 0}
    return {
        "rows": int(a.size),
        "min": int(a.min()),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
        "total": int(a.sum()),
    }


def preview_pieces(ds: Any, tokenizer: Any, n: int) -> list[tuple[str, list[tuple[bool, str]]]]:
    """The first ``n`` rows as (header, [(trained, text), ...]): runs of trained and context tokens."""
    examples = []
    for i in range(min(n, len(ds))):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        runs: list[tuple[bool, list[int]]] = []
        for tok_id, label in zip(ids, labels):
            trained = label != -100
            if runs and runs[-1][0] == trained:
                runs[-1][1].append(tok_id)
            else:
                runs.append((trained, [tok_id]))
        n_trained = sum(1 for label in labels if label != -100)
        header = f"── example {i + 1} ({ds[i]['source']}): {len(ids)} tokens, {n_trained} trained"
        examples.append((header, [(t, tokenizer.decode(g)) for t, g in runs]))
    return examples


def seq2seq_preview_pieces(ds: Any, tokenizer: Any, n: int) -> list[tuple[str, str, str]]:
    """The first ``n`` rows of a seq2seq dataset as (header, source text, target text), special tokens shown."""
    examples = []
    for i in range(min(n, len(ds))):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        header = f"── example {i + 1} ({ds[i]['source']}): source {len(ids)} tokens, target {len(labels)} tokens"
        examples.append((header, tokenizer.decode(ids), tokenizer.decode(labels)))
    return examples


def _plain(pieces: list[tuple[bool, str]]) -> str:
    return "".join(f"⟦{text}⟧" if trained else text for trained, text in pieces)


def _stats_lines(report: dict[str, Any]) -> list[str]:
    t = report["tokens"]
    seq2seq = report.get("task", "causal") == "seq2seq"

    def summary(s: dict[str, Any]) -> str:
        return f"min {s['min']}, median {s['median']:.0f}, p95 {s['p95']:.0f}, max {s['max']}"

    lines = []
    for split in SPLITS:
        s = t.get(split, {})
        if s.get("rows") and seq2seq:
            lines.append(
                f"{split}: {s['rows']} rows; source tokens {summary(s)}; target tokens {summary(t['target'][split])}"
            )
        elif s.get("rows"):
            lines.append(f"{split}: {s['rows']} rows; tokens {summary(s)}")
    longer = "rows had a longer source or target" if seq2seq else "rows were longer"
    lines.append(
        f"max_length: {report['max_length']} ({report['max_length_source']}); "
        f"{t['over_max_length']} {longer} ({report['policy']['too_long']})"
    )
    if seq2seq:
        lines.append(
            f"tokens per epoch: {t['per_epoch']:,} ({t['per_epoch'] - t['trained_per_epoch']:,} source, "
            f"{t['trained_per_epoch']:,} target, all trained)"
        )
    else:
        lines.append(f"tokens per epoch: {t['per_epoch']:,} ({t['trained_per_epoch']:,} trained)")
    return lines


def _preview_text(splits: dict[str, Any], tokenizer: Any, report: dict[str, Any], n: int) -> str:
    train = splits["train"]
    if report.get("task", "causal") == "seq2seq":
        head = (
            f"loratui data preview: {min(n, len(train))} of {len(train)} training examples, "
            "seq2seq (encoder-decoder)\n"
            "The source is the encoder's input; the target, between ⟦ and ⟧, is the decoder's labels "
            "(every token trained).\n"
        )
        blocks = [
            f"{h}\nsource: {src}\ntarget: ⟦{tgt}⟧\n" for h, src, tgt in seq2seq_preview_pieces(train, tokenizer, n)
        ]
        return "\n".join([head, *blocks, *_stats_lines(report)]) + "\n"
    head = (
        f"loratui data preview: {min(n, len(train))} of {len(train)} training examples, "
        f"template: {report['template']}\n"
        "Trained tokens are between ⟦ and ⟧; the rest is context only (label -100).\n"
    )
    blocks = [f"{h}\n{_plain(p)}\n" for h, p in preview_pieces(train, tokenizer, n)]
    return "\n".join([head, *blocks, *_stats_lines(report)]) + "\n"


def _render_notes(report: dict[str, Any]) -> list[str]:
    """Sentences on how the chat template shaped the examples: rows split per turn, the date it wrote."""
    notes = []
    if report.get("per_turn"):
        p = report["per_turn"]
        notes.append(f"{p['rows']} multi-turn rows became {p['examples']} per-turn examples because {p['why']}.")
    if report.get("render_date"):
        notes.append(
            f"The chat template writes today's date: every example is rendered with {report['render_date']}, "
            "the date recorded for this run."
        )
    return notes


def _problem_lists(out: BuildFindings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ordered = sorted(out.problems, key=lambda p: (p.file, p.row or 0))
    return (
        [p.to_dict() for p in ordered if p.action != "truncated"],
        [p.to_dict() for p in ordered if p.action == "truncated"],
    )


def _problem_counts(out: BuildFindings) -> dict[str, int]:
    counts = Counter(p.kind for p in out.problems)
    return {kind: counts[kind] for kind in PROBLEMS if counts[kind]}


def _write_failure_report(target: Path, out: BuildFindings, cfg: RunConfig) -> None:
    dropped, truncated = _problem_lists(out)
    report = {
        "files": out.files,
        "rows": {"read": out.rows_read, "kept": 0, "dropped": len(dropped), "truncated": len(truncated)},
        "splits": {s: 0 for s in SPLITS},
        "problems": _problem_counts(out),
        "policy": {kind: _policy(cfg, kind) for kind in PROBLEMS},
        "dropped": dropped,
        "truncated": truncated,
    }
    with atomic_dir(target) as tmp:
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(tmp / "report.md", _report_markdown(report))


def _report_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    out = ["# Data report", "", "| file | split | format | why | rows | valid |", "|---|---|---|---|---|---|"]
    for f in report["files"]:
        out.append(f"| {f['path']} | {f['split']} | {f['format']} | {f['reason']} | {f['rows']} | {f['valid']} |")
    out += [
        "",
        f"Rows read: {rows['read']}; kept: {rows['kept']} "
        f"(train {report['splits']['train']}, validation {report['splits']['validation']}, "
        f"test {report['splits']['test']}); dropped: {rows['dropped']}; truncated: {rows['truncated']}.",
        "",
    ]
    notes = _render_notes(report)
    if notes:
        out += [*notes, ""]
    if report["problems"]:
        out += ["| problem | rows | policy | meaning |", "|---|---|---|---|"]
        for kind, count in report["problems"].items():
            out.append(f"| {kind} | {count} | {report['policy'][kind]} | {PROBLEMS[kind]} |")
        out += ["", "## Rows dropped or truncated", ""]
        out += [
            f"- {p['file']}, row {p.get('row', '-')}{', field ' + repr(p['field']) if p.get('field') else ''}: "
            f"{p['message']} ({p['kind']}, {p['action']})"
            for p in report["dropped"] + report["truncated"]
        ]
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (
            f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template"))
            or f.suffix == ".model"
        ):
            h.update(f.name.encode())
            h.update(_sha256_file(f).encode())
    return h.hexdigest()


def cache_key(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    model_dir: Path,
    template_source: str,
    task: Task = "causal",
    render_rules: str = "",
) -> str:
    """Key over the inputs of the build. The task enters only for seq2seq, and ``render_rules``
    (:attr:`ChatTemplate.render_rules`: the render date, reasoning handling) only when there are any,
    so the keys of other inputs stay as they were."""
    h = hashlib.sha256()
    settings = cfg.data.model_dump(mode="json", exclude={"preview_examples"})
    h.update(json.dumps({"version": DATA_VERSION, "settings": settings}, sort_keys=True).encode())
    for split in SPLITS:
        for path in files[split]:
            h.update(f"{split}:{path}:{_sha256_file(path)}".encode())
    h.update(_tokenizer_fingerprint(model_dir).encode())
    h.update(template_source.encode())
    if task != "causal":
        h.update(f"task:{task}".encode())
    if render_rules:
        h.update(f"render:{render_rules}".encode())
    return h.hexdigest()[:20]


def datasets_cache() -> Path:
    from loratui.pipeline.models import loratui_home

    return loratui_home() / "datasets"


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _install(cached: Path, target: Path) -> None:
    with atomic_dir(target) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def build(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    tokenizer: Any,
    template: Any,
    model_dir: Path,
    out_dir: Path,
    events: EventSink,
    should_stop: ShouldStop,
    key: str,
    task: Task = "causal",
) -> dict[str, Any]:
    seq2seq = task == "seq2seq"
    out = BuildFindings()
    by_split: dict[str, list[Example]] = {}
    for split in SPLITS:
        by_split[split] = read_examples(cfg, files[split], out, split, task)
        if should_stop():
            raise StepCancelled("cancelled while reading")
    events.progress(1, 4, task="stages", message="validated rows")
    splits = split_examples(cfg, by_split, out)
    encoded = {
        s: encode_examples(rows, tokenizer, template, cfg, events, should_stop, s, task=task)
        for s, rows in splits.items()
    }
    split_rows = [per_turn_counts(ds) for ds in encoded.values() if ds is not None and not seq2seq]
    per_turn = {"rows": sum(r for r, _ in split_rows), "examples": sum(e for _, e in split_rows)}
    events.progress(2, 4, task="stages", message="tokenized")
    context = _model_context(tokenizer, model_dir)
    if seq2seq:  # max_length bounds the source and the target each; auto fits the longest of either
        counted = [token_counts(ds) for ds in encoded.values() if ds is not None]
        lengths = [int(n) for source, _ in counted for n in source]
        target_lengths = [int(n) for _, target in counted for n in target]
        max_length = resolve_max_length(cfg, lengths + target_lengths, context)
        over = sum(1 for a, b in zip(lengths, target_lengths) if a > max_length or b > max_length)
    else:
        lengths = [int(n) for ds in encoded.values() if ds is not None for n in token_counts(ds)[0]]
        max_length = resolve_max_length(cfg, lengths, context)
        over = sum(1 for n in lengths if n > max_length)
    for split, ds in encoded.items():
        if ds is not None:
            encoded[split] = apply_length_policy(ds, max_length, cfg, out, task)
    events.progress(3, 4, task="stages", message="applied max_length")

    processed = out_dir / "processed"
    tokens: dict[str, Any] = {}
    target_stats: dict[str, Any] = {}
    counts: dict[str, int] = {}
    trained = 0
    for split, ds in encoded.items():
        counts[split] = 0 if ds is None else len(ds)
        split_lengths, split_trained = token_counts(ds) if ds is not None else ([], [0])
        tokens[split] = _stats(split_lengths)
        if seq2seq:
            target_stats[split] = _stats(split_trained if ds is not None else [])
        if split == "train":
            trained = int(sum(split_trained))
        if ds is not None and len(ds):
            ds.save_to_disk(str(processed / split))
    train = encoded["train"]
    if train is None or not len(train):
        raise NoTrainingData(out, f"after applying max_length {max_length}")
    if seq2seq:  # the source runs through the encoder, the target through the decoder
        tokens.update(
            target=target_stats,
            over_max_length=over,
            per_epoch=tokens["train"]["total"] + trained,
            trained_per_epoch=trained,
        )
        length_source = "auto: longest source or target rounded up to 64, capped by the model context"
    else:
        tokens.update(over_max_length=over, per_epoch=tokens["train"]["total"], trained_per_epoch=trained)
        length_source = "auto: longest example rounded up to 64, capped by the model context"
    dropped, truncated = _problem_lists(out)
    report = {
        "files": out.files,
        "rows": {
            "read": out.rows_read,
            "kept": sum(counts.values()),
            "dropped": len(dropped),
            "truncated": len(truncated),
        },
        "splits": counts,
        "problems": _problem_counts(out),
        "policy": {kind: _policy(cfg, kind) for kind in PROBLEMS},
        "dropped": dropped,
        "truncated": truncated,
        "task": task,
        "template": template.name if template is not None else None,
        "max_length": max_length,
        "max_length_source": length_source if cfg.data.max_length == "auto" else "data.max_length",
        "tokens": tokens,
        "cache_key": key,
    }
    if per_turn["rows"]:
        report["per_turn"] = per_turn | {
            "why": f"the {template.name} chat template rewrites earlier turns, so each "
            "assistant turn is trained as the model sees it when it is the last"
        }
    if template is not None and template.uses_date:
        report["render_date"] = template.date.isoformat()
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "report.md", _report_markdown(report))
    atomic_write_text(out_dir / "preview.txt", _preview_text(encoded, tokenizer, report, cfg.data.preview_examples))
    manifest = {
        "task": task,
        "splits": {s: str(Path("processed") / s) for s, n in counts.items() if n},
        "counts": counts,
        "template": template.name if template is not None else None,
        "chat_template": template.source if template is not None else None,
        "render_date": template.date.isoformat() if template is not None else None,
        "max_length": max_length,
        "model_dir": str(model_dir),
        "cache_key": key,
        "data_version": DATA_VERSION,
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    return report


def model_task(model_dir: Path, trust_remote_code: bool = False) -> Task:
    """``seq2seq`` for an encoder-decoder model (``is_encoder_decoder`` in its config), else ``causal``.

    Reads only the config (no weights), through AutoConfig so that architectures whose config class
    implies it (T5, BART, PEGASUS) answer right even when config.json leaves the flag out.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    except (OSError, ValueError, KeyError):  # an architecture this transformers does not know: the raw file
        try:
            raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "causal"
        encoder_decoder = isinstance(raw, dict) and raw.get("is_encoder_decoder") is True
    return "seq2seq" if encoder_decoder else "causal"


@dataclass(frozen=True)
class ModelInputs:
    """What the data step takes from the base model."""

    tokenizer: Any
    template: Any  # the ChatTemplate for a causal model; None for seq2seq (no chat template is used)
    path: Path
    task: Task


def load_model_inputs(cfg: RunConfig, events: EventSink) -> ModelInputs:
    """Resolve the model, load its fast tokenizer, tell its task and (causal only) resolve the template."""
    from transformers import AutoTokenizer

    from loratui.pipeline.data.templates import resolve_template
    from loratui.pipeline.models import resolve_model

    model = resolve_model(cfg.model.base, revision=cfg.model.revision, log=events.log)
    tokenizer = AutoTokenizer.from_pretrained(str(model.path), trust_remote_code=cfg.model.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise LoratuiError(
            f"{model.path}: the data step needs a fast (Rust) tokenizer for offsets",
            hint="Provide tokenizer.json with the model.",
        )
    task = model_task(model.path, cfg.model.trust_remote_code)
    template = None
    if task == "causal":
        template = resolve_template(cfg.data.template, tokenizer, run_render_date(RunDir.for_config(cfg)))
    return ModelInputs(tokenizer, template, model.path, task)


def run_render_date(run: RunDir) -> dt.date:
    """The date chat templates render "today" as in this run: the one its data step recorded, else today."""
    from loratui.pipeline.data.templates import today

    try:
        recorded = json.loads((run.data / "dataset.json").read_text(encoding="utf-8")).get("render_date")
        return dt.date.fromisoformat(recorded)
    except (OSError, ValueError, TypeError, AttributeError):  # no data yet, or a manifest from before the date
        return today()


def load_tokenizer_and_template(cfg: RunConfig, events: EventSink) -> tuple[Any, Any, Path]:
    """(tokenizer, chat template or None for seq2seq, model dir): :func:`load_model_inputs` without the task."""
    m = load_model_inputs(cfg, events)
    return m.tokenizer, m.template, m.path


def _seq2seq_warnings(cfg: RunConfig, events: EventSink) -> None:
    d = cfg.data
    if d.train_on_prompt:
        events.log(
            "data.train_on_prompt is ignored for a seq2seq (encoder-decoder) model: the source is the "
            "encoder's input and every target token is trained",
            level="warning",
        )
    if d.template != "auto":
        events.log(
            f"data.template={d.template} is ignored for a seq2seq (encoder-decoder) model: examples are "
            "a source text and a target, not a rendered chat",
            level="warning",
        )


def model_cache_key(cfg: RunConfig, files: dict[str, list[Path]], model: ModelInputs) -> str:
    """:func:`cache_key` for the inputs :func:`load_model_inputs` resolved."""
    template = model.template
    return cache_key(
        cfg,
        files,
        model.path,
        template.source if template is not None else "",
        model.task,
        template.render_rules if template is not None else "",
    )


def build_cached(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    model: ModelInputs,
    events: EventSink,
    should_stop: ShouldStop,
    failure_dir: Path | None = None,
    *,
    key: str | None = None,
    quiet: bool = False,
) -> tuple[Path, bool]:
    """Build the datasets of ``cfg.data`` into the content-addressed cache (once); returns (folder, hit).

    The folder is shared and read-only for callers: the step copies it into the run; the evaluate step
    reads earlier datasets from it for its retention check. ``key``: the cache key when the caller has
    it already; ``quiet``: no log line for a cache hit.
    """
    key = key or model_cache_key(cfg, files, model)
    cached = datasets_cache() / key
    hit = (cached / "dataset.json").is_file()
    if hit:
        if not quiet:
            events.log(f"data: cache hit ({cached}); nothing to recompute")
        return cached, True
    try:
        with atomic_dir(cached) as tmp:
            build(
                cfg, files, model.tokenizer, model.template, model.path, tmp, events, should_stop, key, task=model.task
            )
    except NoTrainingData as e:  # still list every dropped row where the user will look
        if failure_dir is not None:
            _write_failure_report(failure_dir, e.out, cfg)
        raise
    return cached, False


def _installed_key(run: RunDir) -> str | None:
    """The cache key of the datasets in the run's data folder, when they are all there."""
    try:
        manifest = json.loads((run.data / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not (run.data / "report.json").is_file():
        return None
    if not all((run.data / p).is_dir() for p in (manifest.get("splits") or {}).values()):
        return None
    return manifest.get("cache_key")


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop, *, quiet: bool = False) -> StepResult:
    """The data step. ``quiet`` (for later steps, through :func:`prepare`): when the run's data folder
    already holds these very datasets, say so in one line instead of logging the data summary again."""
    started = time.monotonic()
    files = split_files(cfg)
    if not quiet:
        events.progress(0, 4, task="stages", message="reading")
    model = load_model_inputs(cfg, events)
    model_dir, task = model.path, model.task
    key = model_cache_key(cfg, files, model)
    up_to_date = quiet and _installed_key(run) == key and (datasets_cache() / key / "dataset.json").is_file()
    if quiet and not up_to_date:  # new or changed data: the full account, as `loratui data` gives it
        quiet = False
        events.progress(0, 4, task="stages", message="reading")
    if task == "seq2seq" and not quiet:
        events.log(f"data: {model_dir.name} is an encoder-decoder model: seq2seq examples (source -> target)")
        _seq2seq_warnings(cfg, events)
    cached, hit = build_cached(cfg, files, model, events, should_stop, failure_dir=run.data, key=key, quiet=quiet)
    if not up_to_date:  # the run's folder holds these datasets already otherwise
        _install(cached, run.data)
    manifest_path = run.data / "dataset.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("model_dir") != str(model_dir):  # the cache is keyed by content; the model may have moved
        manifest["model_dir"] = str(model_dir)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    report = json.loads((run.data / "report.json").read_text(encoding="utf-8"))
    if not quiet:
        events.progress(4, 4, task="stages", message="done")

    if cfg.data.max_length == "auto":  # written back so the run is reproducible from config.yaml
        cfg.data.max_length = report["max_length"]
        write_config(run.config, cfg)
    summary = {
        "splits": report["splits"],
        "dropped": report["rows"]["dropped"],
        "truncated": report["rows"]["truncated"],
        "max_length": report["max_length"],
        "template": report["template"],
        "task": report.get("task", "causal"),
        "cache_hit": hit,
        "seconds": round(time.monotonic() - started, 2),
    }
    if quiet:
        dropped = report["rows"]["dropped"]
        events.log(
            f"data: up to date ({report['splits']['train']} train rows"
            + (f", {dropped} dropped: see {run.data / 'report.json'})" if dropped else ")")
        )
        return StepResult(summary=summary, artifacts=[str(run.data / "report.json"), str(run.data / "processed")])
    for f in report["files"]:
        events.log(f"{f['path']} ({f['split']}): {f['format']}, {f['reason']}")
    for line in _render_notes(report):
        events.log(f"data: {line}")
    for kind, count in report["problems"].items():
        events.log(f"{count} rows: {kind} ({report['policy'][kind]}): {PROBLEMS[kind]}", level="warning")
    events.metric(
        {f"rows_{s}": float(n) for s, n in report["splits"].items()}
        | {"dropped": float(report["rows"]["dropped"]), "tokens_per_epoch": float(report["tokens"]["per_epoch"])}
    )
    for name, kind in (("report.json", "data-report"), ("preview.txt", "data-preview"), ("processed", "dataset")):
        events.artifact(run.data / name, kind=kind)
    return StepResult(summary=summary, artifacts=[str(run.data / "report.json"), str(run.data / "processed")])


def prepare(cfg: RunConfig, run_dir: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    """Run the data step for a later step (a cache hit when nothing changed); returns its manifest.

    Its events go out under the step name ``data``, through the caller's writers. When the run's data
    folder is already up to date (the data step ran with these inputs), that is one log line, not the
    data summary again: ``loratui run`` would otherwise repeat it before train, eval, merge and export.
    """
    run(cfg, run_dir, EventSink("data", events.writers), should_stop, quiet=True)
    return json.loads((run_dir.data / "dataset.json").read_text(encoding="utf-8"))


def show_preview(cfg: RunConfig, n: int | None = None) -> None:
    """Print examples with trained tokens highlighted (``loratui data preview``), after the step ran."""
    from datasets import load_from_disk
    from rich.console import Console
    from rich.text import Text
    from transformers import AutoTokenizer

    run = RunDir.for_config(cfg)
    manifest = json.loads((run.data / "dataset.json").read_text())
    train = load_from_disk(str(run.data / manifest["splits"]["train"]))
    tokenizer = AutoTokenizer.from_pretrained(manifest["model_dir"])
    console = Console()
    count = cfg.data.preview_examples if n is None else n
    report = json.loads((run.data / "report.json").read_text(encoding="utf-8"))
    if manifest.get("task", "causal") == "seq2seq":
        console.print(
            f"[bold]{min(count, len(train))} of {len(train)} training examples[/], seq2seq: "
            "source = the encoder's input, [green]target = the decoder's labels (all trained) in green[/]"
        )
        for header, source, target in seq2seq_preview_pieces(train, tokenizer, count):
            console.print(Text(header, style="cyan"))
            console.print(Text.assemble(("source: ", "dim"), source))
            console.print(Text.assemble(("target: ", "dim"), (target, "bold green")))
        console.print(Text("\n".join(_stats_lines(report))))
        return
    console.print(
        f"[bold]{min(count, len(train))} of {len(train)} training examples[/], template "
        f"{manifest['template']}: [green]trained tokens in green[/], [dim]context (label -100) dim[/]"
    )
    for header, pieces in preview_pieces(train, tokenizer, count):
        text = Text()
        for trained, piece in pieces:
            text.append(piece, style="bold green" if trained else "dim")
        console.print(Text(header, style="cyan"))
        console.print(text)
    console.print(Text("\n".join(_stats_lines(report))))
