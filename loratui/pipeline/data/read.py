"""Reading the data files of a run into validated examples, deduplicated and split.

Rows that cannot be used become :class:`RowProblem` findings (or stop the step where
``data.on_problem`` says ``fail``); :class:`BuildFindings` collects them for the report.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.formats import (
    KIND_NAMES,
    Example,
    PreferenceKind,
    apply_columns,
    detect_format,
    preference_of,
    to_example,
)
from loratui.pipeline.data.loaders import bundled_split, expand_sources, is_bundled, load_file
from loratui.pipeline.data.problems import DEFAULT_POLICY, Policy, ProblemKind, RowError, RowProblem
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.models import Task

SPLITS = ("train", "validation", "test")


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


def split_files(cfg: RunConfig) -> dict[str, list[Path]]:
    """The files of each split: ``data.source`` trains; held-out splits from their own sources or a bundled set."""
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


def problem_policy(cfg: RunConfig, kind: str) -> Policy:
    """What ``data.on_problem`` does with rows of problem ``kind``: drop, truncate or fail."""
    return cfg.data.on_problem.get(cast(ProblemKind, kind), DEFAULT_POLICY[kind])


def note_problem(cfg: RunConfig, out: BuildFindings, problem: RowProblem) -> None:
    """Record ``problem``, or stop the step when its policy is ``fail``."""
    if problem_policy(cfg, problem.kind) == "fail":
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
                note_problem(cfg, out, RowProblem(record.kind, name, number, record.message, record.field))
            else:
                good.append((number, apply_columns(record, d.columns)))
        info: dict[str, Any] = {"path": name, "split": split, "kind": loaded.kind, "rows": len(loaded.rows)}
        fmt, reason = _file_format(cfg, loaded.kind, [r for _, r in good], name)
        info.update(format=fmt, reason=reason)
        if task == "seq2seq" and fmt == "text":
            _reject_text_for_seq2seq(name, loaded.kind, reason)
        if task == "seq2seq" and preference_of(fmt) != "none":
            raise LoratuiError(
                f"{name}: {fmt} rows ({reason}) are preference data, and preference tuning needs a decoder-only "
                "(causal) model; the model is an encoder-decoder (seq2seq) one",
                hint="Choose a decoder-only model in model.base for dpo, orpo or kto, or train this model on "
                "supervised rows (question/answer, instruction/output, messages).",
            )
        valid: list[Example] = []
        for number, record in good if fmt != "unknown" else []:
            try:
                ex = to_example(record, fmt, name, number, d.system_prompt)
            except RowError as e:
                note_problem(cfg, out, RowProblem(e.kind, name, number, e.message, e.field))
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


def preference_kind(out: BuildFindings) -> PreferenceKind:
    """What the rows of all files read are: "paired", "unpaired" or "none" (plain examples).

    Every file of a run's splits must hold the same kind: a preference objective cannot train on a
    supervised row, and a mix of pairs and unpaired verdicts is no one dataset. One LoratuiError names
    the files of each kind otherwise.
    """
    kinds: dict[str, list[str]] = {}
    for f in out.files:
        if f.get("format", "unknown") != "unknown":
            kinds.setdefault(preference_of(f["format"]), []).append(f"{f['path']} ({f['split']}, {f['format']})")
    if len(kinds) > 1:
        listed = "; ".join(f"{KIND_NAMES[kind]}: {', '.join(files)}" for kind, files in kinds.items())
        raise LoratuiError(
            f"the data files mix kinds of rows: {listed}",
            hint="Preference rows train with train.objective dpo or orpo (pairs) or kto (unpaired); use files "
            "of one kind for every split (data.source, data.val_source, data.test_source).",
        )
    kind = next(iter(kinds), "none")
    return "paired" if kind == "paired" else "unpaired" if kind == "unpaired" else "none"


def _file_format(cfg: RunConfig, kind: str, records: list[dict[str, Any]], name: str) -> tuple[str, str]:
    """(format, why) of a file: a document is text, else ``data.format`` or what its valid rows show."""
    if kind == "document":
        return "text", "a document: chunked by tokens"
    if cfg.data.format != "auto":
        return cfg.data.format, "set by data.format"
    if not records:
        return "unknown", "no valid rows to detect the format from"
    detection = detect_format(records, name)
    return detection.format, detection.reason


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
            note_problem(cfg, out, RowProblem(kind, ex.file, ex.row, f"same content as {what} ({seen[k]})"))
            continue
        seen.setdefault(k, f"{ex.file}, row {ex.row}")
        kept.append(ex)
    return kept


def _ratio_split(
    cfg: RunConfig, pool: list[Example], by_split: dict[str, list[Example]]
) -> tuple[list[Example], dict[str, list[Example]]]:
    """(train, {validation, test}) cut from ``pool`` by the ratios, seeded; a split with its own files gets none."""
    d = cfg.data
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
    return [pool[i] for i in sorted(order[cut:])], splits


def split_examples(cfg: RunConfig, by_split: dict[str, list[Example]], out: BuildFindings) -> dict[str, list[Example]]:
    """Deterministic ratio split (unless files per split were given), deduplicated within and across."""
    d = cfg.data
    pool = by_split["train"]
    if d.dedupe:
        pool = _dedupe(cfg, pool, {}, out, "duplicate")
    train, splits = _ratio_split(cfg, pool, by_split)
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
