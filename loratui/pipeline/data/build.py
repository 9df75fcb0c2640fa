"""Building the datasets of a run's data settings: read, split, tokenize, fit to max_length, write.

:func:`build` writes one folder (report.json, report.md, preview.txt, dataset.json, processed/);
:func:`build_cached` builds it once into the content-addressed cache (:mod:`.cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.augment import MethodContext, augment
from loratui.pipeline.data.cache import DATA_VERSION, cache_key, datasets_cache
from loratui.pipeline.data.encode import per_turn_counts, token_counts
from loratui.pipeline.data.formats import Example, PreferenceKind
from loratui.pipeline.data.manifest import (
    AugmentReport,
    DataReport,
    DatasetManifest,
    LengthStats,
    PerTurn,
    RowCounts,
    TokenCounts,
)
from loratui.pipeline.data.pairs import note_encode_problems, pair_lengths
from loratui.pipeline.data.read import (
    SPLITS,
    BuildFindings,
    NoTrainingData,
    preference_kind,
    read_examples,
    split_examples,
)
from loratui.pipeline.data.summary import (
    length_stats,
    preview_text,
    problem_counts,
    problem_lists,
    problem_policies,
    report_markdown,
    write_failure_report,
)
from loratui.pipeline.data.templates import ChatTemplate
from loratui.pipeline.data.tokens import apply_length_policy, encode_examples, model_context, resolve_max_length
from loratui.pipeline.errors import StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.models import ModelInputs, Task
from loratui.pipeline.runs import atomic_dir, atomic_write_text
from loratui.pipeline.steps import ShouldStop

AUTO_LENGTH_SOURCE = {
    "causal": "auto: longest example rounded up to 64, capped by the model context",
    "seq2seq": "auto: longest source or target rounded up to 64, capped by the model context",
}


def build(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    tokenizer: Any,
    template: ChatTemplate | None,
    model_dir: Path,
    out_dir: Path,
    events: EventSink,
    should_stop: ShouldStop,
    key: str,
    task: Task = "causal",
) -> DataReport:
    """Build the datasets of ``files`` into ``out_dir``; returns the report it wrote there."""
    out = BuildFindings()
    splits, kind = _read_splits(cfg, files, out, events, should_stop, task)
    augmented = _augment(cfg, splits, events, should_stop)
    encoded = {
        s: note_encode_problems(
            encode_examples(rows, tokenizer, template, cfg, events, should_stop, s, task=task), cfg, out
        )
        for s, rows in splits.items()
    }
    per_turn = _per_turn(encoded) if task == "causal" else (0, 0)
    events.progress(2, 4, task="stages", message="tokenized")
    max_length, over = _fit_max_length(cfg, encoded, model_context(tokenizer, model_dir), task, kind)
    for split, ds in encoded.items():
        if ds is not None:
            encoded[split] = apply_length_policy(ds, max_length, cfg, out, task)
    events.progress(3, 4, task="stages", message="applied max_length")
    counts, tokens = _save_splits(encoded, out_dir / "processed", task, kind)
    train = encoded["train"]
    if train is None or not len(train):
        raise NoTrainingData(out, f"after applying max_length {max_length}")
    tokens.over_max_length = over
    report = _report(cfg, out, counts, tokens, template, max_length, key, task)
    report.preference = kind
    if augmented is not None:
        report.augment = augmented
    _template_notes(report, template, per_turn)
    report.save(out_dir)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    atomic_write_text(out_dir / "preview.txt", preview_text(train, tokenizer, report, cfg.data.preview_examples))
    manifest = _manifest(counts, template, max_length, model_dir, key, task)
    manifest.preference = kind
    manifest.save(out_dir)
    return report


def _read_splits(
    cfg: RunConfig,
    files: dict[str, list[Path]],
    out: BuildFindings,
    events: EventSink,
    should_stop: ShouldStop,
    task: Task,
) -> tuple[dict[str, list[Example]], PreferenceKind]:
    """The validated examples of each split, deduplicated and split by ratio where no files were given, and
    what kind of rows they are (preference pairs, unpaired preference rows or none: one kind for all files)."""
    by_split: dict[str, list[Example]] = {}
    for split in SPLITS:
        by_split[split] = read_examples(cfg, files[split], out, split, task)
        if should_stop():
            raise StepCancelled("cancelled while reading")
    kind = preference_kind(out)
    events.progress(1, 4, task="stages", message="validated rows")
    return split_examples(cfg, by_split, out), kind


def _augment(
    cfg: RunConfig, splits: dict[str, list[Example]], events: EventSink, should_stop: ShouldStop
) -> AugmentReport | None:
    """``data.augment``: variations of the training rows join the training split (after the split, so
    validation and test never hold one); the report's part, or None when it is off."""
    settings = cfg.data.augment
    if settings is None or not settings.methods:
        return None
    m = cfg.model
    ctx = MethodContext(
        base_model=m.base,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        events=events,
        should_stop=should_stop,
    )
    splits["train"], report = augment(settings, splits, ctx)
    if not report.rows:
        events.log("data.augment: no training row has a user turn to vary (documents, text or preference rows)")
    return report


def _per_turn(encoded: dict[str, Any]) -> tuple[int, int]:
    """(chat rows split into one example per assistant turn, the examples they became) over all splits."""
    split_rows = [per_turn_counts(ds) for ds in encoded.values() if ds is not None]
    return sum(r for r, _ in split_rows), sum(e for _, e in split_rows)


def _fit_max_length(
    cfg: RunConfig, encoded: dict[str, Any], context: int, task: Task, kind: PreferenceKind = "none"
) -> tuple[int, int]:
    """(max_length, rows longer than it). For seq2seq it bounds the source and the target each, and
    ``auto`` fits the longest of either; the same for the chosen and the rejected side of preference pairs."""
    if kind == "paired":
        sides = [pair_lengths(ds) for ds in encoded.values() if ds is not None]
        longest = [int(max(c, r)) for chosen, _, rejected, _ in sides for c, r in zip(chosen, rejected)]
        max_length = resolve_max_length(cfg, longest, context)
        return max_length, sum(1 for n in longest if n > max_length)
    counted = [token_counts(ds) for ds in encoded.values() if ds is not None]
    lengths = [int(n) for source, _ in counted for n in source]
    if task != "seq2seq":
        max_length = resolve_max_length(cfg, lengths, context)
        return max_length, sum(1 for n in lengths if n > max_length)
    target_lengths = [int(n) for _, target in counted for n in target]
    max_length = resolve_max_length(cfg, lengths + target_lengths, context)
    return max_length, sum(1 for a, b in zip(lengths, target_lengths) if a > max_length or b > max_length)


def _split_counts(ds: Any, kind: PreferenceKind) -> tuple[Any, Any]:
    """Per sequence of ``ds``: tokens and trained tokens; both sides of each preference pair."""
    import numpy as np

    if ds is None:
        return [], [0]
    if kind != "paired":
        return token_counts(ds)
    chosen, chosen_trained, rejected, rejected_trained = pair_lengths(ds)
    return np.concatenate([chosen, rejected]), np.concatenate([chosen_trained, rejected_trained])


def _save_splits(
    encoded: dict[str, Any], processed: Path, task: Task, kind: PreferenceKind = "none"
) -> tuple[dict[str, int], TokenCounts]:
    """Save each split with rows under ``processed``; (rows per split, token statistics).

    For preference pairs the statistics count both sides: a split's ``rows`` are its pairs, its lengths
    those of every chosen and rejected sequence, its total (and the tokens per epoch) both sides'."""
    counts: dict[str, int] = {}
    stats: dict[str, LengthStats] = {}
    target_stats: dict[str, LengthStats] = {}
    trained = 0
    for split, ds in encoded.items():
        counts[split] = 0 if ds is None else len(ds)
        split_lengths, split_trained = _split_counts(ds, kind)
        stats[split] = length_stats(split_lengths)
        if ds is not None and kind == "paired":
            stats[split].rows = len(ds)
        target_stats[split] = length_stats(split_trained if ds is not None else [])
        if split == "train":
            trained = int(sum(split_trained))
        if ds is not None and len(ds):
            ds.save_to_disk(str(processed / split))
    train_total = stats["train"].total
    tokens = TokenCounts(
        train=stats["train"],
        validation=stats["validation"],
        test=stats["test"],
        over_max_length=0,
        # the seq2seq source runs through the encoder, the target through the decoder
        per_epoch=train_total + trained if task == "seq2seq" else train_total,
        trained_per_epoch=trained,
    )
    if task == "seq2seq":
        tokens.target = target_stats
    return counts, tokens


def _report(
    cfg: RunConfig,
    out: BuildFindings,
    counts: dict[str, int],
    tokens: TokenCounts,
    template: ChatTemplate | None,
    max_length: int,
    key: str,
    task: Task,
) -> DataReport:
    dropped, truncated = problem_lists(out)
    return DataReport(
        files=out.files,
        rows=RowCounts(read=out.rows_read, kept=sum(counts.values()), dropped=len(dropped), truncated=len(truncated)),
        splits=counts,
        problems=problem_counts(out),
        policy=problem_policies(cfg),
        dropped=dropped,
        truncated=truncated,
        task=task,
        template=template.name if template is not None else None,
        max_length=max_length,
        max_length_source=AUTO_LENGTH_SOURCE[task] if cfg.data.max_length == "auto" else "data.max_length",
        tokens=tokens,
        cache_key=key,
    )


def _template_notes(report: DataReport, template: ChatTemplate | None, per_turn: tuple[int, int]) -> None:
    """Add to ``report`` how the chat template shaped the examples: rows split per turn, the date it wrote."""
    if template is None:
        return
    rows, examples = per_turn
    if rows:
        why = (
            f"the {template.name} chat template rewrites earlier turns, so each "
            "assistant turn is trained as the model sees it when it is the last"
        )
        report.per_turn = PerTurn(rows=rows, examples=examples, why=why)
    if template.uses_date:
        report.render_date = template.date.isoformat()


def _manifest(
    counts: dict[str, int], template: ChatTemplate | None, max_length: int, model_dir: Path, key: str, task: Task
) -> DatasetManifest:
    return DatasetManifest(
        task=task,
        splits={s: str(Path("processed") / s) for s, n in counts.items() if n},
        counts=counts,
        template=template.name if template is not None else None,
        chat_template=template.source if template is not None else None,
        render_date=template.date.isoformat() if template is not None else None,
        max_length=max_length,
        model_dir=str(model_dir),
        cache_key=key,
        data_version=DATA_VERSION,
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

    The folder is shared and read-only for callers: the step copies it into the run; the eval step
    reads earlier datasets from it for its retention check. ``key``: the cache key when the caller has
    it already; ``quiet``: no log line for a cache hit.
    """
    key = key or model_cache_key(cfg, files, model)
    cached = datasets_cache() / key
    hit = (cached / DatasetManifest.FILE).is_file()
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
            write_failure_report(failure_dir, e.out, cfg)
        raise
    return cached, False
