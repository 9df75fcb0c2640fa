"""The eval step's files: metrics.json, metrics.csv, comparison.md, generations.jsonl and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.eval import metrics as M
from loratui.pipeline.runs import RunDir

# metrics.csv: one row per model and dataset, always these columns (empty where not computed).
CSV_COLUMNS: tuple[str, ...] = ("dataset", "split", "model", "samples", *M.ALL_METRICS)
SCHEMA_VERSION = 1


def _num(v: float) -> float | None:
    """JSON has no inf/nan: they become null."""
    return None if v is None or math.isnan(v) or math.isinf(v) else v


def _clean(d: dict[str, float]) -> dict[str, float | None]:
    return {k: _num(v) for k, v in d.items()}


def metrics_json(sets: list[Any], results: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    datasets = []
    for s in sets:
        entry: dict[str, Any] = {
            "name": s.name,
            "source": s.source,
            "split": s.split,
            "rows": len(s.examples),
            "models": {},
        }
        if s.preference != "none":  # loss and perplexity are the chosen replies'
            entry["preference"] = s.preference
        for model, per_set in results.items():
            sc = per_set[s.name]
            entry["models"][model] = {
                "metrics": _clean(sc.metrics),
                "generated": sc.generated,
                "scored_tokens": sc.scored_tokens,
            }
        if "base" in results and "tuned" in results:
            entry["delta"] = _clean(M.deltas(results["tuned"][s.name].metrics, results["base"][s.name].metrics))
        datasets.append(entry)
    return {"schema": SCHEMA_VERSION, **info, "datasets": datasets}


def metrics_csv(sets: list[Any], results: dict[str, dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for s in sets:
        for model, per_set in results.items():
            sc = per_set[s.name]
            row: dict[str, Any] = {"dataset": s.name, "split": s.split, "model": model, "samples": len(s.examples)}
            for k in M.ALL_METRICS:
                v = sc.metrics.get(k)
                row[k] = "" if v is None else f"{v:.6g}"
            w.writerow(row)
    return buf.getvalue()


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if metric in ("bleu", "perplexity") else f"{v:.3f}"


def _fmt_delta(metric: str, d: float) -> str:
    better = d < 0 if metric in M.LOWER_IS_BETTER else d > 0
    sign = "+" if d >= 0 else ""
    mark = "" if abs(d) < 1e-12 else (" ▲" if better else " ▼")
    return f"{sign}{_fmt(metric, d)}{mark}"


def table(sets: list[Any], results: dict[str, dict[str, Any]], name: str) -> list[str]:
    """Markdown table: a metric per row, base / tuned / delta columns."""
    models = list(results)
    wanted = [k for k in M.ALL_METRICS if any(k in results[m][name].metrics for m in models)]
    head = ["metric", *models] + (["delta"] if {"base", "tuned"} <= set(models) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for k in wanted:
        cells = [k] + [_fmt(k, results[m][name].metrics.get(k)) for m in models]
        if "delta" in head:
            b, t = results["base"][name].metrics.get(k), results["tuned"][name].metrics.get(k)
            cells.append(_fmt_delta(k, t - b) if b is not None and t is not None and math.isfinite(t - b) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _case_score(row: dict[str, float] | None) -> tuple[float, float, float]:
    if row is None:
        return (-1.0, -1.0, -1.0)
    return (row["contains"], row["token_f1"], row["rougeL"])


def _quote(text: str | None, limit: int = 600) -> str:
    if text is None:
        return "_(not generated)_"
    text = text if len(text) <= limit else text[:limit] + " …"
    return "\n".join("> " + line if line else ">" for line in (text or "(empty)").splitlines()) or "> (empty)"


def comparison_md(sets: list[Any], results: dict[str, dict[str, Any]], info: dict[str, Any], n: int) -> str:
    main = sets[0]
    lines = [
        f"# Evaluation: {info['run']}",
        "",
        f"Greedy decoding, at most {info['decoding']['max_new_tokens']} new tokens; {main.split} split of "
        f"`{main.source}` ({len(main.examples)} rows). Tuned: {info['target']['kind']} `{info['target']['path']}`.",
        "ROUGE, exact match, token F1 and contains are fractions (0 to 1); BLEU is 0 to 100; loss is nats "
        "per reference token. ▲ better, ▼ worse.",
        "",
    ]
    kinds = {s.preference for s in sets} - {"none"}
    if kinds:
        lines += [preference_note(kinds), ""]
    lines += table(sets, results, main.name)
    for s in sets[1:]:
        lines += ["", f"## Retention: {s.name} ({s.split} split, {len(s.examples)} rows)", ""]
        lines += table(sets, results, s.name)
    if main.preference != "none" and n:
        from loratui.pipeline.eval.preference_report import preference_cases

        cases = preference_cases(main, results, n)
        if cases:
            return "\n".join(lines + cases).rstrip() + "\n"
    lines += _generation_cases(main, results, n)
    return "\n".join(lines).rstrip() + "\n"


def _generation_cases(main: Any, results: dict[str, dict[str, Any]], n: int) -> list[str]:
    """The worst and best rows of the tuned model, with the reference and both models' replies."""
    lines: list[str] = []
    tuned = results["tuned"][main.name]
    base = results.get("base", {}).get(main.name)
    ranked = sorted((i for i, r in enumerate(tuned.rows) if r is not None), key=lambda i: _case_score(tuned.rows[i]))
    if n and ranked:
        worst = ranked[: (n + 1) // 2]
        best = [i for i in reversed(ranked) if i not in worst][: n // 2]
        for title, picks in (("Worst cases (tuned)", worst), ("Best cases (tuned)", best)):
            if not picks:
                continue
            lines += ["", f"## {title}", ""]
            for i in picks:
                e, row = main.examples[i], tuned.rows[i]
                lines += [
                    f"### {e.source or f'row {i + 1}'}",
                    "",
                    "**Prompt**",
                    "",
                    _quote(e.prompt),
                    "",
                    "**Reference**" + (f" (key fact: `{e.fact}`)" if e.fact else ""),
                    "",
                    _quote(e.reference),
                    "",
                ]
                if base is not None:
                    brow = base.rows[i]
                    lines += [
                        f"**Base** (token F1 {_fmt('token_f1', brow['token_f1'] if brow else None)}, "
                        f"contains {_fmt('contains', brow['contains'] if brow else None)})",
                        "",
                        _quote(base.replies[i]),
                        "",
                    ]
                lines += [
                    f"**Tuned** (token F1 {_fmt('token_f1', row['token_f1'])}, contains "
                    f"{_fmt('contains', row['contains'])})",
                    "",
                    _quote(tuned.replies[i]),
                    "",
                ]
    return lines


PREFERENCE_NOTES = {
    "paired": "Paired rows: preference_accuracy is the share of rows whose chosen reply is more likely than the "
    "rejected one, reward_margin the mean log p(chosen) - log p(rejected), each reply's log-probability summed over "
    "its trained tokens (nats); the tuned - base delta of reward_margin is DPO's implicit reward margin divided by "
    "beta.",
    "unpaired": "Unpaired rows: on the tuned model's log-ratio to the base, log p_tuned - log p_base of the "
    "completion (summed over its trained tokens, nats), preference_accuracy is the share of rows whose sign agrees "
    "with the label (above 0 for a good completion, below 0 for a bad one) and reward_margin the mean over good "
    "rows minus the mean over bad rows; the base model has neither. Bad completions are no reference for the "
    "generation metrics, nor counted in loss and perplexity.",
}


def preference_note(kinds: set[str]) -> str:
    """comparison.md's account of the preference metrics of the ``kinds`` of preference data scored."""
    return " ".join(
        [
            "Preference data: loss and perplexity score the chosen replies, the generation metrics take the chosen reply "
            "as the reference."
        ]
        + [PREFERENCE_NOTES[k] for k in ("paired", "unpaired") if k in kinds]
    )


def generations_jsonl(sets: list[Any], results: dict[str, dict[str, Any]]) -> str:
    from loratui.pipeline.eval.preference_report import preference_record

    out = []
    for s in sets:
        for i, e in enumerate(s.examples):
            if e.reference is None and s.preference == "none":
                continue
            rec: dict[str, Any] = {
                "dataset": s.name,
                "source": e.source,
                "prompt": e.prompt,
                "reference": e.reference,
                "fact": e.fact,
            }
            for model, per_set in results.items():
                sc = per_set[s.name]
                rec[model] = {"reply": sc.replies[i], "scores": sc.rows[i]}
            if s.preference != "none":
                preference_record(rec, s, i, results)
            out.append(json.dumps(rec, ensure_ascii=False))
    return "\n".join(out) + ("\n" if out else "")


def summary_lines(sets: list[Any], results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for s in sets:
        label = "" if s.name == "main" else f" [{s.name}]"
        for k in M.ALL_METRICS:
            vals = {m: results[m][s.name].metrics.get(k) for m in results}
            if all(v is None for v in vals.values()):
                continue
            parts = "  ".join(f"{m} {_fmt(k, v)}" for m, v in vals.items())
            out.append(f"{k}{label}: {parts}")
    return out


def write_all(
    out: Path, sets: list[Any], results: dict[str, dict[str, Any]], info: dict[str, Any], cfg: RunConfig, run: RunDir
) -> list[tuple[str, str]]:
    """Every file into ``out`` (a temporary folder the caller renames into place); (name, kind) of each."""
    from loratui.pipeline.eval import plots

    data = metrics_json(sets, results, info)
    (out / "metrics.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "metrics.csv").write_text(metrics_csv(sets, results), encoding="utf-8")
    (out / "comparison.md").write_text(
        comparison_md(sets, results, info, cfg.eval.comparison_examples), encoding="utf-8"
    )
    (out / "generations.jsonl").write_text(generations_jsonl(sets, results), encoding="utf-8")
    written = [
        ("metrics.json", "eval-metrics"),
        ("metrics.csv", "eval-metrics-csv"),
        ("comparison.md", "eval-comparison"),
        ("generations.jsonl", "eval-generations"),
    ]
    (out / "plots").mkdir()
    drawn = plots.draw_all(out / "plots", sets, results, training_curve(info, run))
    written += [(f"plots/{name}", "plot") for name in drawn]
    return written


def training_curve(info: dict[str, Any], run: RunDir) -> tuple[dict[int, float], dict[int, float]]:
    """The loss curve of the adapter evaluated: the one saved with it by the train step (the whole run, across
    a resume; its own version's after a rollback or a re-train), else, for adapters from older loratui
    versions and merged models, the latest training run in events.jsonl."""
    from loratui.pipeline.eval import plots
    from loratui.pipeline.train.history import load_curve

    target = info.get("target") or {}
    saved = load_curve(Path(target["path"])) if target.get("kind") == "adapter" and target.get("path") else None
    return saved if saved is not None else plots.training_curves(run.events)
