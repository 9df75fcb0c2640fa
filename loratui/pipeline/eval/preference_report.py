"""Preference rows in the eval step's files: the side-by-side tables of comparison.md and the fields of
generations.jsonl (see :mod:`loratui.pipeline.eval.preference` for the figures)."""

from __future__ import annotations

from typing import Any

from loratui.pipeline.eval.preference import row_margin

CELL_LIMIT = 300  # characters of a text shown in a table cell

_EXPLAIN = {
    "paired": "Each reply cell opens with that model's log p(chosen) - log p(rejected) in nats, summed over the "
    "replies' trained tokens (above 0: it prefers the chosen reply); the rows are ordered by the tuned model's.",
    "unpaired": "The base reply cell opens with the base model's log p(completion), the tuned one with the tuned "
    "model's log-ratio log p_tuned - log p_base (nats; it should be above 0 for a good completion, below 0 for a "
    "bad one); the rows are ordered by that log-ratio signed by the label.",
}


def cell(text: str | None, limit: int = CELL_LIMIT) -> str:
    """``text`` inside one Markdown table cell: pipes escaped, line breaks as <br>, long texts cut."""
    if text is None:
        return "_(not generated)_"
    if not text.strip():
        return "(empty)"
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _figure(value: float | None, what: str = "") -> str:
    return "" if value is None else f"**{what}{value:+.2f}**<br>"


def _row(s: Any, i: int, tuned: Any, base: Any | None) -> str:
    e = s.examples[i]
    prompt = (f"`{e.source}`<br>" if e.source else "") + cell(e.prompt)
    if s.preference == "paired":
        cells = [prompt, cell(e.reference), cell(e.rejected.reference if e.rejected else None)]
    else:
        label = "good" if e.preference_label else "bad"
        cells = [prompt, cell(e.extra.get("completion")), label]
    if base is not None:
        if s.preference == "paired":
            cells.append(_figure(row_margin(s, i, base, base)) + cell(base.replies[i]))
        else:
            logp = base.chosen_logp[i] if base.chosen_logp is not None else None
            cells.append(_figure(logp, "log p ") + cell(base.replies[i]))
    ratio = row_margin(s, i, tuned, base)
    if s.preference == "unpaired" and ratio is not None and not e.preference_label:
        ratio = -ratio  # the log-ratio itself, not signed by the label
    cells.append(_figure(ratio) + cell(tuned.replies[i]))
    return "| " + " | ".join(cells) + " |"


def preference_cases(s: Any, results: dict[str, dict[str, Any]], n: int) -> list[str]:
    """comparison.md's side-by-side rows of the preference set ``s``: the ``n`` rows the tuned model gets most
    wrong (half) and most right, as tables; nothing when the per-row figures were not computed."""
    tuned = results["tuned"][s.name]
    base = results.get("base", {}).get(s.name)
    margins = [row_margin(s, i, tuned, base) for i in range(len(s.examples))]
    ranked = sorted((i for i, m in enumerate(margins) if m is not None), key=lambda i: margins[i] or 0.0)
    if not ranked:
        return []
    worst = ranked[: (n + 1) // 2]
    best = [i for i in reversed(ranked) if i not in worst][: n // 2]
    sides = ["chosen", "rejected"] if s.preference == "paired" else ["completion", "label"]
    head = ["prompt", *sides] + (["base reply"] if base is not None else []) + ["tuned reply"]
    noun = "pairs" if s.preference == "paired" else "rows"
    lines: list[str] = []
    for title, picks in ((f"Worst {noun} (tuned)", worst), (f"Best {noun} (tuned)", best)):
        if not picks:
            continue
        lines += ["", f"## {title}", "", _EXPLAIN[s.preference], ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [_row(s, i, tuned, base) for i in picks]
    return lines


def preference_record(rec: dict[str, Any], s: Any, i: int, results: dict[str, dict[str, Any]]) -> None:
    """The preference fields of row ``i`` of ``s`` in its generations.jsonl record ``rec``: the rejected reply
    (paired) or the completion and its label (unpaired), and each model's log-probabilities."""
    e = s.examples[i]
    if s.preference == "paired":
        rec["rejected"] = e.rejected.reference if e.rejected else None
    else:
        rec["completion"], rec["label"] = e.extra.get("completion"), e.preference_label
    for model, per_set in results.items():
        sc = per_set[s.name]
        if sc.chosen_logp is not None:
            rec[model]["chosen_logp" if s.preference == "paired" else "completion_logp"] = sc.chosen_logp[i]
        if sc.rejected_logp is not None:
            rec[model]["rejected_logp"] = sc.rejected_logp[i]
