"""PNG plots of the eval step (matplotlib's object API with the Agg canvas: no display, no global state).

* ``loss.png``: training and eval loss of the latest training run, from the run's events.jsonl;
* ``metrics.png``: base vs tuned for every metric on the main dataset (generation, loss, preference panels);
* ``retention.png``: base vs tuned on each earlier dataset (continual training), when there are any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loratui.pipeline.eval import metrics as M

COLORS = {"base": "#9aa5b1", "tuned": "#2f6fdf"}


def training_curves(events_file: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, step -> eval loss) of the latest training run that finished, from ``events_file``.

    Runs end at a train ``done`` or ``error`` event. A cancelled run and its resume read as one
    curve (the resume overwrites the steps it repeats); a run that failed, or one still going after
    the last success, is not the one that produced the adapter and is skipped.
    """
    if not events_file.is_file():
        return {}, {}
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for e in _latest_training_metrics(events_file):
        values = e.get("values", {})
        if "loss" in values and e.get("split") in (None, "train"):
            train[int(e["at"])] = float(values["loss"])
        if "eval_loss" in values:
            evals[int(e["at"])] = float(values["eval_loss"])
    return train, evals


def _latest_training_metrics(events_file: Path) -> list[dict[str, Any]]:
    """The train metric events (with a step) of the latest run that ended ``done``, else of the last run."""
    runs: list[tuple[list[dict[str, Any]], str | None]] = []
    current: list[dict[str, Any]] = []
    for line in events_file.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("step") != "train":
            continue
        if e.get("type") == "metric" and e.get("at") is not None:
            current.append(e)
        elif e.get("type") in ("done", "error"):
            runs.append((current, e["type"]))
            current = []
    finished = [metrics for metrics, end in runs if end == "done"]
    return finished[-1] if finished else current


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def loss_plot(path: Path, train: dict[int, float], evals: dict[int, float]) -> bool:
    if not train and not evals:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", color=COLORS["tuned"], linewidth=1.5)
    if evals:
        steps = sorted(evals)
        ax.plot(steps, [evals[s] for s in steps], label="eval loss", color="#e07b00", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Training run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def _bars(ax: Any, names: list[str], per_model: dict[str, list[float | None]], legend: bool = True) -> None:
    width = 0.8 / max(len(per_model), 1)
    for j, (model, values) in enumerate(per_model.items()):
        xs = [i + (j - (len(per_model) - 1) / 2) * width for i in range(len(names))]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=model, color=COLORS.get(model, None))
        for b, v in zip(bars, values):
            if v is not None and math.isfinite(v):
                ax.annotate(
                    f"{v:.2f}",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend()


def metrics_plot(path: Path, results: dict[str, dict[str, Any]], name: str, title: str) -> bool:
    """Fractions (and BLEU / 100) in one panel, loss and perplexity in another, and on preference data the
    preference accuracy and reward margin (nats) in a third."""
    scores = {m: results[m][name].metrics for m in results}
    rates = _present(M.GENERATION_METRICS, scores)
    losses = _present(M.LOSS_METRICS, scores)
    prefs = _present(M.PREFERENCE_METRICS, scores)
    panels = [keys for keys in (rates, losses, prefs) if keys]
    if not panels:
        return False
    fig = _figure(4.0 + 2.5 * len(panels) if len(panels) > 1 else 7.0, 4.0)
    axes = list(fig.subplots(1, len(panels), width_ratios=[len(k) for k in panels], squeeze=False)[0])
    legend = True  # on the first panel only
    if rates:
        labels = ["bleu/100" if k == "bleu" else k for k in rates]
        ax = axes.pop(0)
        _bars(ax, labels, {m: [_as_fraction(values, k) for k in rates] for m, values in scores.items()})
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{title}: generation (higher is better)")
        legend = False
    if losses:
        ax = axes.pop(0)
        _bars(ax, losses, {m: [values.get(k) for k in losses] for m, values in scores.items()}, legend=legend)
        ax.set_yscale("log")
        ax.set_title("lower is better")
        legend = False
    if prefs:
        ax = axes.pop(0)
        _bars(ax, prefs, {m: [values.get(k) for k in prefs] for m, values in scores.items()}, legend=legend)
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.set_title("preference (higher is better;\nmargin in nats)")
    fig.savefig(path)
    return True


def _present(keys: tuple[str, ...], scores: dict[str, dict[str, float]]) -> list[str]:
    """The metrics among ``keys`` that any model has, in the order of ``keys``."""
    return [k for k in keys if any(k in values for values in scores.values())]


def _as_fraction(values: dict[str, float], key: str) -> float | None:
    """A generation metric on the 0-1 scale of the others (BLEU is 0-100)."""
    value = values.get(key)
    return value / 100 if key == "bleu" and value is not None else value


def retention_plot(path: Path, sets: list[Any], results: dict[str, dict[str, Any]]) -> bool:
    """One group per dataset: the first generation metric present (contains, else token F1, ...), or loss."""
    if len(sets) < 2:
        return False
    tuned = results["tuned"]
    key = next(
        (
            k
            for k in ("contains", "token_f1", "rougeL", "exact_match", "loss")
            if all(k in tuned[s.name].metrics for s in sets)
        ),
        None,
    )
    if key is None:
        return False
    fig = _figure(max(6.0, 1.6 * len(sets)), 4.0)
    ax = fig.add_subplot()
    names = ["this run" if s.name == "main" else s.name for s in sets]
    _bars(ax, names, {m: [results[m][s.name].metrics.get(key) for s in sets] for m in results})
    ax.set_title(f"Retention: {key} on every dataset the adapter was trained on")
    fig.savefig(path)
    return True


def draw_all(
    folder: Path, sets: list[Any], results: dict[str, dict[str, Any]], curve: tuple[dict[int, float], dict[int, float]]
) -> list[str]:
    """Draw what applies (``curve``: the train and eval loss to plot); returns the file names written."""
    written = []
    if loss_plot(folder / "loss.png", *curve):
        written.append("loss.png")
    if metrics_plot(folder / "metrics.png", results, sets[0].name, "base vs tuned"):
        written.append("metrics.png")
    if retention_plot(folder / "retention.png", sets, results):
        written.append("retention.png")
    return written
