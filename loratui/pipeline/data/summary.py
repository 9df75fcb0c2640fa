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


def _stats_lines(report: DataReport) -> list[str]:
    t = report.tokens
    assert t is not None, "a report of a finished build"
    seq2seq = report.task == "seq2seq"

    def summary(s: LengthStats) -> str:
        return f"min {s.min}, median {s.median:.0f}, p95 {s.p95:.0f}, max {s.max}"

    lines = []
    for split in SPLITS:
        s = t.split(split)
        if s.rows and seq2seq and t.target is not None:
            lines.append(
                f"{split}: {s.rows} rows; source tokens {summary(s)}; target tokens {summary(t.target[split])}"
            )
        elif s.rows:
            lines.append(f"{split}: {s.rows} rows; tokens {summary(s)}")
    longer = "rows had a longer source or target" if seq2seq else "rows were longer"
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
        lines.append(f"tokens per epoch: {t.per_epoch:,} ({t.trained_per_epoch:,} trained)")
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
    notes = render_notes(report)
    if notes:
        out += [*notes, ""]
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
        return
    console.print(
        f"[bold]{min(count, len(train))} of {len(train)} training examples[/], template "
        f"{manifest.template}: [green]trained tokens in green[/], [dim]context (label -100) dim[/]"
    )
    for header, pieces in preview_pieces(train, tokenizer, count):
        text = Text()
        for trained, piece in pieces:
            text.append(piece, style="bold green" if trained else "dim")
        console.print(Text(header, style="cyan"))
        console.print(text)
    console.print(Text("\n".join(_stats_lines(report))))
