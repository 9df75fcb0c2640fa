"""The data step: files -> validated examples -> templated, masked, split token datasets.

Writes ``runs/<name>/data/``:
  report.json, report.md   what was read, detected, dropped or truncated (row by row), split, tokenized
  preview.txt              examples through the template with the trained tokens marked, length stats
  dataset.json             manifest for later steps: task, splits, template, render_date, max_length, cache key
  processed/<split>/       ``datasets`` saved to disk: input_ids, labels, source, messages, meta, chunk; for
                           preference pairs also rejected_input_ids, rejected_labels, rejected; for unpaired
                           preference rows (KTO) preference_label (1 desirable, 0 undesirable)

The task follows the model (:func:`loratui.pipeline.models.model_task`): ``causal`` for decoder-only
models (a chat through its template, loss on the assistant turns) or ``seq2seq`` for encoder-decoder
models such as T5, FLAN-T5 and PEGASUS (``input_ids`` is the source text for the encoder, ``labels`` the target for the
decoder; no chat template; ``max_length`` applies to each of them; the report's ``tokens.<split>``
are source lengths and ``tokens.target.<split>`` target lengths).

Preference rows (:mod:`.preference`: prompt/chosen/rejected, OpenAI's preference rows, KTO's
prompt/completion/label) are encoded by :mod:`.pairs`: only the final reply of a row is trained, and
``data.train_on_prompt`` does not apply to them (a warning says so when it is set). ``preference`` in
dataset.json and report.json says which kind the splits hold: "paired", "unpaired" or "none". They need a
decoder-only model, and every file of a run holds the same kind.

This module is the recipe; the library it runs: :mod:`.read` (files to split examples), :mod:`.tokens`
(token datasets, max_length), :mod:`.summary` (report and preview), :mod:`.cache`, :mod:`.build` (the
whole build, cached) and :mod:`.manifest` (dataset.json and report.json as records). Later steps run
it through :func:`.prepare.prepare`.

The result is cached in ``$LORATUI_HOME/datasets/<key>`` under a key over the file contents, the
tokenizer, the template and the data settings; a second run with the same inputs only copies it.

``render_date`` (ISO, in dataset.json and, for templates that write the date, in the report): the
date a chat template that inserts "today" renders with. It is the day the data step first ran for
the run, read back from the run's dataset.json ever after (:func:`.manifest.run_render_date`), so
renders, cache key and later steps do not change with the calendar. It enters the cache key only for
templates that write the date.
"""

from __future__ import annotations

import time
from pathlib import Path

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.build import build_cached, model_cache_key
from loratui.pipeline.data.cache import datasets_cache, install
from loratui.pipeline.data.manifest import DataReport, DatasetManifest
from loratui.pipeline.data.problems import PROBLEMS
from loratui.pipeline.data.read import split_files
from loratui.pipeline.data.summary import augment_lines, render_notes
from loratui.pipeline.events import EventSink
from loratui.pipeline.models import load_model_inputs
from loratui.pipeline.runs import RunDir, write_config
from loratui.pipeline.steps import ShouldStop, StepResult


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


def _installed_key(run: RunDir) -> str | None:
    """The cache key of the datasets in the run's data folder, when they are all there."""
    try:
        manifest = DatasetManifest.load(run.data)
    except (OSError, ValueError):
        return None
    if not (run.data / DataReport.FILE).is_file():
        return None
    if not all((run.data / p).is_dir() for p in manifest.splits.values()):
        return None
    return manifest.cache_key


def _record_model_dir(run: RunDir, model_dir: Path) -> None:
    """Point the run's manifest at ``model_dir``: the cache is keyed by content, and the model may have moved."""
    manifest = DatasetManifest.load(run.data)
    if manifest.model_dir != str(model_dir):
        manifest.model_dir = str(model_dir)
        manifest.save(run.data)


def _preference_warnings(cfg: RunConfig, report: DataReport, events: EventSink) -> None:
    if report.preference != "none" and cfg.data.train_on_prompt:
        events.log(
            "data.train_on_prompt is ignored for preference rows: only the final reply of each row is trained "
            "(the objective compares the replies; the prompt is context)",
            level="warning",
        )


def _log_summary(report: DataReport, events: EventSink, run: RunDir) -> None:
    """What ``loratui data`` tells: the files, the template notes, the problems, the metrics and artifacts."""
    for f in report.files:
        events.log(f"{f['path']} ({f['split']}): {f['format']}, {f['reason']}")
    if report.preference != "none":
        what = "preference pairs" if report.preference == "paired" else "unpaired preference rows (KTO)"
        events.log(f"data: {report.splits['train']} training {what}")
    for line in render_notes(report) + augment_lines(report):
        events.log(f"data: {line}")
    for kind, count in report.problems.items():
        events.log(f"{count} rows: {kind} ({report.policy[kind]}): {PROBLEMS[kind]}", level="warning")
    per_epoch = report.tokens.per_epoch if report.tokens is not None else 0
    events.metric(
        {f"rows_{s}": float(n) for s, n in report.splits.items()}
        | {"dropped": float(report.rows.dropped), "tokens_per_epoch": float(per_epoch)}
    )
    for name, kind in (("report.json", "data-report"), ("preview.txt", "data-preview"), ("processed", "dataset")):
        events.artifact(run.data / name, kind=kind)


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop, *, quiet: bool = False) -> StepResult:
    """The data step. ``quiet`` (for later steps, through :func:`.prepare.prepare`): when the run's data
    folder already holds these very datasets, say so in one line instead of logging the data summary again."""
    started = time.monotonic()
    files = split_files(cfg)
    if not quiet:
        events.progress(0, 4, task="stages", message="reading")
    model = load_model_inputs(cfg, events)
    key = model_cache_key(cfg, files, model)
    up_to_date = quiet and _installed_key(run) == key and (datasets_cache() / key / DatasetManifest.FILE).is_file()
    if quiet and not up_to_date:  # new or changed data: the full account, as `loratui data` gives it
        quiet = False
        events.progress(0, 4, task="stages", message="reading")
    if model.task == "seq2seq" and not quiet:
        events.log(f"data: {model.path.name} is an encoder-decoder model: seq2seq examples (source -> target)")
        _seq2seq_warnings(cfg, events)
    cached, hit = build_cached(cfg, files, model, events, should_stop, failure_dir=run.data, key=key, quiet=quiet)
    if not up_to_date:  # the run's folder holds these datasets already otherwise
        install(cached, run.data)
    _record_model_dir(run, model.path)
    report = DataReport.load(run.data)
    if not quiet:
        events.progress(4, 4, task="stages", message="done")

    if cfg.data.max_length == "auto":  # written back so the run is reproducible from config.yaml
        cfg.data.max_length = report.max_length
        write_config(run.config, cfg)
    summary = {
        "splits": report.splits,
        "dropped": report.rows.dropped,
        "truncated": report.rows.truncated,
        "max_length": report.max_length,
        "template": report.template,
        "task": report.task,
        "cache_hit": hit,
        **({"augmented": sum(report.augment.added.values())} if report.augment is not None else {}),
        "seconds": round(time.monotonic() - started, 2),
    }
    artifacts = [str(run.data / DataReport.FILE), str(run.data / "processed")]
    if quiet:
        dropped = report.rows.dropped
        events.log(
            f"data: up to date ({report.splits['train']} train rows"
            + (f", {dropped} dropped: see {run.data / DataReport.FILE})" if dropped else ")")
        )
        return StepResult(summary=summary, artifacts=artifacts)
    _preference_warnings(cfg, report, events)
    _log_summary(report, events, run)
    return StepResult(summary=summary, artifacts=artifacts)
