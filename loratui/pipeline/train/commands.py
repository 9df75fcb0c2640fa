"""``loratui train history`` and ``loratui train rollback <version>``."""

from __future__ import annotations

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import RunDir
from loratui.pipeline.train import history as hist


def history(cfg: RunConfig, words: list[str]) -> int:
    """Print every adapter version of the run, the current one marked."""
    from rich.console import Console
    from rich.table import Table

    run = RunDir.for_config(cfg)
    data = hist.AdapterHistory.load(run)
    console = Console()
    if not data.versions:
        console.print(f"{run.path}: no adapter trained yet")
        return 0
    table = Table(
        "", "version", "mode", "objective", "on top of", "data", "steps", "train loss", "eval loss", "created"
    )
    for v in data.versions:
        m = v.metrics
        table.add_row(
            "*" if v.version == data.current else "",
            f"v{v.version}",
            v.mode,
            v.objective or "sft",
            " + ".join(f"v{x}" if isinstance(x, int) else str(x) for x in v.stack) or "base",
            str(v.data["source"]),
            str(v.steps),
            _fmt(m.get("train_loss_last")),
            _fmt(m.get("eval_loss_best")),
            v.created or "",
        )
    console.print(table)
    return 0


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def rollback(cfg: RunConfig, words: list[str]) -> int:
    """Make an earlier adapter version current again (``loratui train rollback 1`` or ``v1``)."""
    if len(words) != 1 or not words[0].lstrip("v").isdigit():
        raise LoratuiError(
            "usage: loratui train rollback <version> (a number such as 1 or v1)",
            hint="`loratui train history` lists the versions.",
        )
    run = RunDir.for_config(cfg)
    entry = hist.rollback(run, int(words[0].lstrip("v")))
    print(f"{run.adapter} is now v{entry.version} ({entry.mode}, data {entry.data['source']})")
    return 0
