"""What the data step shows a person: report.md, preview.txt, the report of a failed build and
``loratui data preview``; and the length statistics and problem lists the report holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DataReport, DatasetManifest, LengthStats, RowCounts
from loratui.pipeline.data.problems import PROBLEMS
from loratui.pipeline.data.read import SPLITS, BuildFindings, problem_policy
from loratui.pipeline.runs import RunDir, atomic_dir, atomic_write_text


def length_stats(lengths: Any) -> LengthStats:
    """Row count, min, median, 95th percentile, max and total of token ``lengths`` (a sequence or array)."""
    import numpy as np

    a = np.asarray(lengths)
    if not a.size:
        return LengthStats(rows=0)
    return LengthStats(
        rows=int(a.size),
        min=int(a.min()),
        median=float(np.median(a)),
        p95=float(np.percentile(a, 95)),
        max=int(a.max()),
        total=int(a.sum()),
    )


Pieces = list[tuple[bool, str]]  # runs of (trained, text)


def _pieces(ids: list[int], labels: list[int], tokenizer: Any) -> Pieces:
    """Runs of trained and context tokens, decoded."""
    runs: list[tuple[bool, list[int]]] = []
    for tok_id, label in zip(ids, labels):
        trained = label != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok_id)
        else:
            runs.append((trained, [tok_id]))
    return [(t, tokenizer.decode(g)) for t, g in runs]


def _trained_count(labels: list[int]) -> int:
    return sum(1 for label in labels if label != -100)


def preview_pieces(ds: Any, tokenizer: Any, n: int) -> list[tuple[str, Pieces]]:
    """The first ``n`` rows as (header, [(trained, text), ...]): runs of trained and context tokens.

    An unpaired preference row's header says whether its reply is desirable."""
    examples = []
    verdicts = "preference_label" in ds.column_names
    for i in range(min(n, len(ds))):
        row = ds[i]
        ids, labels = row["input_ids"], row["labels"]
        header = f"── example {i + 1} ({row['source']}): {len(ids)} tokens, {_trained_count(labels)} trained"
        if verdicts:
            header += ", a desirable reply" if row["preference_label"] else ", an undesirable reply"
        examples.append((header, _pieces(ids, labels, tokenizer)))
    return examples


def pair_preview_pieces(ds: Any, tokenizer: Any, n: int) -> list[tuple[str, Pieces, Pieces]]:
    """The first ``n`` pairs as (header, the prompt and the chosen reply, the rejected reply): the rejected
    sequence is shown from where it leaves the prompt the two share."""
    examples = []
    for i in range(min(n, len(ds))):
        row = ds[i]
        ids, labels = row["input_ids"], row["labels"]
        rejected_ids, rejected_labels = row["rejected_input_ids"], row["rejected_labels"]
        shared = next((k for k, label in enumerate(rejected_labels) if label != -100), len(rejected_ids))
        header = (
            f"── pair {i + 1} ({row['source']}): chosen {len(ids)} tokens, {_trained_count(labels)} trained; "
            f"rejected {len(rejected_ids)} tokens, {_trained_count(rejected_labels)} trained"
        )
        chosen = _pieces(ids, labels, tokenizer)
        rejected = _pieces(rejected_ids[shared:], rejected_labels[shared:], tokenizer)
        examples.append((header, chosen, rejected))
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


def _stats_lines(report: DataReport) -> list[str]:
    t = report.tokens
    assert t is not None, "a report of a finished build"
    seq2seq = report.task == "seq2seq"

    def summary(s: LengthStats) -> str:
        return f"min {s.min}, median {s.median:.0f}, p95 {s.p95:.0f}, max {s.max}"

    lines = []
    paired = report.preference == "paired"
    for split in SPLITS:
        s = t.split(split)
        if s.rows and seq2seq and t.target is not None:
            lines.append(
                f"{split}: {s.rows} rows; source tokens {summary(s)}; target tokens {summary(t.target[split])}"
            )
        elif s.rows and paired:
            lines.append(f"{split}: {s.rows} pairs; tokens per side (chosen or rejected) {summary(s)}")
        elif s.rows:
            lines.append(f"{split}: {s.rows} rows; tokens {summary(s)}")
    longer = "rows had a longer source or target" if seq2seq else "rows were longer"
    longer = "pairs had a longer side" if paired else longer
    lines.append(
        f"max_length: {report.max_length} ({report.max_length_source}); "
        f"{t.over_max_length} {longer} ({report.policy['too_long']})"
    )
    if seq2seq:
        lines.append(
            f"tokens per epoch: {t.per_epoch:,} ({t.per_epoch - t.trained_per_epoch:,} source, "
            f"{t.trained_per_epoch:,} target, all trained)"
        )
    else:
        sides = " on both sides of the pairs" if paired else ""
        lines.append(f"tokens per epoch: {t.per_epoch:,} ({t.trained_per_epoch:,} trained){sides}")
    return lines


def preview_text(train: Any, tokenizer: Any, report: DataReport, n: int) -> str:
    """preview.txt: the first ``n`` rows of the ``train`` dataset as trained, then the length statistics."""
    if report.task == "seq2seq":
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
    if report.preference == "paired":
        head = (
            f"loratui data preview: {min(n, len(train))} of {len(train)} training pairs, template: {report.template}\n"
            "Each pair: the prompt and the chosen reply, then the rejected reply after the same prompt. Trained "
            "tokens are between ⟦ and ⟧; the rest is context only (label -100).\n"
        )
        blocks = [
            f"{h}\nchosen: {_plain(c)}\nrejected (after the same prompt): {_plain(r)}\n"
            for h, c, r in pair_preview_pieces(train, tokenizer, n)
        ]
        return "\n".join([head, *blocks, *_stats_lines(report)]) + "\n"
    head = (
        f"loratui data preview: {min(n, len(train))} of {len(train)} training examples, "
        f"template: {report.template}\n"
        "Trained tokens are between ⟦ and ⟧; the rest is context only (label -100).\n"
    )
    blocks = [f"{h}\n{_plain(p)}\n" for h, p in preview_pieces(train, tokenizer, n)]
    return "\n".join([head, *blocks, *_stats_lines(report)]) + "\n"


def render_notes(report: DataReport) -> list[str]:
    """Sentences on how the chat template shaped the examples: rows split per turn, the date it wrote."""
    notes = []
    if report.per_turn:
        p = report.per_turn
        notes.append(f"{p.rows} multi-turn rows became {p.examples} per-turn examples because {p.why}.")
    if report.render_date:
        notes.append(
            f"The chat template writes today's date: every example is rendered with {report.render_date}, "
            "the date recorded for this run."
        )
    return notes


def augment_lines(report: DataReport) -> list[str]:
    """One sentence on what ``data.augment`` added and dropped (none when it was off)."""
    a = report.augment
    if a is None:
        return []
    added = sum(a.added.values())
    per_method = ", ".join(f"{m} {n}" for m, n in a.added.items())
    dropped = ", ".join(f"{reason} {n}" for reason, n in a.dropped.items())
    line = (
        f"Augmentation added {added} training rows ({per_method}): variations of the user turns of {a.rows} "
        f"training rows, {a.variations} per row and method, checked against {a.held_out_questions} validation "
        f"and test questions; dropped {sum(a.dropped.values())} variations" + (f" ({dropped})" if dropped else "")
    )
    skipped = f"; {a.skipped} rows had no user turn to vary" if a.skipped else ""
    return [line + skipped + "."]


def _augment_markdown(report: DataReport) -> list[str]:
    a = report.augment
    if a is None:
        return []
    out = ["## Augmentation", "", *augment_lines(report), ""]
    out += [
        f"Held-out rule: a variation is dropped when it normalizes to a validation or test question, or holds "
        f"more than {a.max_overlap} of one's words and pairs of neighbouring words.",
        "",
    ]
    for reason, examples in a.examples.items():
        if reason == "held-out":
            continue
        out += [f"Dropped as {reason} ({a.dropped.get(reason, 0)}), e.g.:", ""]
        out += [f"- {e.original!r} -> {e.variation!r}" for e in examples]
        out.append("")
    if a.held_out:
        out += [f"Dropped as held-out ({len(a.held_out)}), each with the question it matched:", ""]
        out += [f"- {e.original!r} -> {e.variation!r} (matched {e.matched!r}, overlap {e.overlap})" for e in a.held_out]
        out.append("")
    if a.samples:
        out += ["Variations of the first rows:", ""]
        out += [f"- {s.original!r} -> " + "; ".join(repr(v) for v in s.variations) for s in a.samples]
        out.append("")
    return out


def problem_lists(out: BuildFindings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ordered = sorted(out.problems, key=lambda p: (p.file, p.row or 0))
    return (
        [p.to_dict() for p in ordered if p.action != "truncated"],
        [p.to_dict() for p in ordered if p.action == "truncated"],
    )


def problem_counts(out: BuildFindings) -> dict[str, int]:
    counts = Counter(p.kind for p in out.problems)
    return {kind: counts[kind] for kind in PROBLEMS if counts[kind]}


def problem_policies(cfg: RunConfig) -> dict[str, str]:
    """The report's ``policy``: what ``data.on_problem`` does with each kind of problem."""
    return {kind: problem_policy(cfg, kind) for kind in PROBLEMS}


def write_failure_report(target: Path, out: BuildFindings, cfg: RunConfig) -> None:
    """report.json and report.md in ``target`` for a build that left nothing to train on."""
    dropped, truncated = problem_lists(out)
    report = DataReport(
        files=out.files,
        rows=RowCounts(read=out.rows_read, kept=0, dropped=len(dropped), truncated=len(truncated)),
        splits={s: 0 for s in SPLITS},
        problems=problem_counts(out),
        policy=problem_policies(cfg),
        dropped=dropped,
        truncated=truncated,
    )
    with atomic_dir(target) as tmp:
        report.save(tmp)
        atomic_write_text(tmp / "report.md", report_markdown(report))


def report_markdown(report: DataReport) -> str:
    """report.md: the files read, the row counts, the problems and every row dropped or truncated."""
    rows, splits = report.rows, report.splits
    out = ["# Data report", "", "| file | split | format | why | rows | valid |", "|---|---|---|---|---|---|"]
    for f in report.files:
        out.append(f"| {f['path']} | {f['split']} | {f['format']} | {f['reason']} | {f['rows']} | {f['valid']} |")
    out += [
        "",
        f"Rows read: {rows.read}; kept: {rows.kept} "
        f"(train {splits['train']}, validation {splits['validation']}, "
        f"test {splits['test']}); dropped: {rows.dropped}; truncated: {rows.truncated}.",
        "",
    ]
    if report.preference != "none":
        what = "Preference pairs (a chosen and a rejected reply each)"
        if report.preference == "unpaired":
            what = "Unpaired preference rows (one reply each, desirable or not: KTO)"
        out += [f"{what}: train {splits['train']}, validation {splits['validation']}, test {splits['test']}.", ""]
    notes = render_notes(report)
    if notes:
        out += [*notes, ""]
    out += _augment_markdown(report)
    if report.problems:
        out += ["| problem | rows | policy | meaning |", "|---|---|---|---|"]
        for kind, count in report.problems.items():
            out.append(f"| {kind} | {count} | {report.policy[kind]} | {PROBLEMS[kind]} |")
        out += ["", "## Rows dropped or truncated", ""]
        out += [
            f"- {p['file']}, row {p.get('row', '-')}{', field ' + repr(p['field']) if p.get('field') else ''}: "
            f"{p['message']} ({p['kind']}, {p['action']})"
            for p in report.dropped + report.truncated
        ]
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"


def show_preview(cfg: RunConfig, n: int | None = None) -> None:
    """Print examples with trained tokens highlighted (``loratui data preview``), after the step ran."""
    from datasets import load_from_disk
    from rich.console import Console
    from rich.text import Text
    from transformers import AutoTokenizer

    run = RunDir.for_config(cfg)
    manifest = DatasetManifest.load(run.data)
    train = load_from_disk(str(run.data / manifest.splits["train"]))
    tokenizer = AutoTokenizer.from_pretrained(manifest.model_dir)
    console = Console()
    count = cfg.data.preview_examples if n is None else n
    report = DataReport.load(run.data)
    if manifest.task == "seq2seq":
        console.print(
            f"[bold]{min(count, len(train))} of {len(train)} training examples[/], seq2seq: "
            "source = the encoder's input, [green]target = the decoder's labels (all trained) in green[/]"
        )
        for header, source, target in seq2seq_preview_pieces(train, tokenizer, count):
            console.print(Text(header, style="cyan"))
            console.print(Text.assemble(("source: ", "dim"), source))
            console.print(Text.assemble(("target: ", "dim"), (target, "bold green")))
        console.print(Text("\n".join(_stats_lines(report))))
        _print_variations(console, report, count)
        return
    what = "pairs" if manifest.preference == "paired" else "examples"
    console.print(
        f"[bold]{min(count, len(train))} of {len(train)} training {what}[/], template "
        f"{manifest.template}: [green]trained tokens in green[/], [dim]context (label -100) dim[/]"
    )
    if manifest.preference == "paired":
        for header, chosen, rejected in pair_preview_pieces(train, tokenizer, count):
            console.print(Text(header, style="cyan"))
            console.print(Text.assemble(("chosen: ", "bold"), _rich(chosen)))
            console.print(Text.assemble(("rejected (after the same prompt): ", "bold"), _rich(rejected)))
    else:
        for header, pieces in preview_pieces(train, tokenizer, count):
            console.print(Text(header, style="cyan"))
            console.print(_rich(pieces))
    console.print(Text("\n".join(_stats_lines(report))))
    _print_variations(console, report, count)


def _print_variations(console: Any, report: DataReport, n: int) -> None:
    """The first ``n`` training rows' user turns beside their variations, when ``data.augment`` made some."""
    from rich.table import Table
    from rich.text import Text

    a = report.augment
    if a is None:
        return
    console.print(Text("\n".join(augment_lines(report))))
    if not a.samples or n <= 0:
        return
    table = Table(title=f"data.augment: originals and their variations ({', '.join(a.methods)})", show_lines=True)
    table.add_column("original", overflow="fold")
    table.add_column("variations", overflow="fold")
    for sample in a.samples[:n]:
        table.add_row(sample.original, "\n".join(sample.variations))
    console.print(table)


def _rich(pieces: Pieces) -> Any:
    from rich.text import Text

    text = Text()
    for trained, piece in pieces:
        text.append(piece, style="bold green" if trained else "dim")
    return text
