"""The eval step: the tuned model against the base model on held-out data, written to ``runs/<name>/eval/``.

```
eval/metrics.json      every figure: per model, per dataset, with deltas (tuned - base)
eval/metrics.csv       one row per model and dataset: rouge1 ... bleu, exact_match, token_f1, contains, loss, perplexity,
                       preference_accuracy, reward_margin (empty where not computed)
eval/comparison.md     the table, then side-by-side replies (prompt, reference, base, tuned), worst cases first;
                       for preference data: prompt, chosen, rejected, base reply, tuned reply
eval/generations.jsonl every reply with its per-row scores
eval/plots/*.png       loss curves of the training run, base vs tuned bars, retention bars
```
Retention: after ``continue`` or ``stack`` training the adapter's history names earlier datasets;
each is re-scored (base and tuned), so a user sees whether the old topic is still answered.

The metrics talk to a model through :class:`~loratui.pipeline.eval.runtimes.EvalModel`; this
step uses the PyTorch implementation (an adapter on its base, or a merged directory).

Preference data (the manifest's ``preference``, see :mod:`loratui.pipeline.eval.preference`) adds
``preference_accuracy`` and ``reward_margin``; loss and perplexity score its chosen replies and the generation
metrics take the chosen reply as the reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loratui.pipeline.config import DataSection, RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.eval import metrics as M
from loratui.pipeline.eval.examples import EvalSet, load_examples, pick_split, source_label, split_source, stop_ids
from loratui.pipeline.eval.runtimes import StopRequested, artifact_kind
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_dir
from loratui.pipeline.steps import ShouldStop, StepResult
from loratui.pipeline.train.history import AdapterHistory, AdapterVersion

Warn = Callable[[str], object]


@dataclass
class Scores:
    """One model on one dataset."""

    metrics: dict[str, float] = field(default_factory=dict)
    replies: list[str | None] = field(default_factory=list)  # per example; None: not generated
    rows: list[dict[str, float] | None] = field(default_factory=list)  # per-example generation metrics
    generated: int = 0
    scored_tokens: int = 0
    # preference sets: summed log-probability of each row's chosen reply (or unpaired completion), and rejected one
    chosen_logp: list[float] | None = None
    rejected_logp: list[float] | None = None


@dataclass
class Target:
    """What is evaluated: an adapter (with adapters merged below it for stack runs) or a merged model."""

    kind: str  # adapter | model
    path: Path
    stack: list[Path]
    meta: AdapterVersion  # the adapter's loratui.json (empty for a merged model or a foreign adapter)


# --------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------


def resolve_target(cfg: RunConfig, run: RunDir) -> Target:
    if cfg.eval.model:
        path = Path(cfg.eval.model).expanduser()
        if not path.exists():
            raise LoratuiError(
                f"eval.model: {path} does not exist",
                hint="Point it at an adapter folder or a merged model directory, or leave it empty.",
            )
    else:
        path = run.adapter
        if not (path / "adapter_config.json").is_file():
            raise LoratuiError(
                f"{path}: there is no trained adapter to evaluate",
                hint="Run `loratui train --config <file>` first, or set eval.model.",
            )
    kind = artifact_kind(path)
    meta = (AdapterVersion.load(path) if kind == "adapter" else None) or AdapterVersion()
    if not _inside(path, run.path):  # its version numbers belong to another run's history
        meta = meta.model_copy(update={"version": None})
    stack = meta.stack_folders()
    for p in stack:
        if not (p / "adapter_config.json").is_file():
            raise LoratuiError(
                f"{path} was trained on top of {p} (a stack run), which is missing",
                hint="Restore that adapter version, or evaluate a merged model with eval.model.",
            )
    return Target(kind, path, stack, meta)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _lineage(run: RunDir, version: int) -> list[AdapterVersion]:
    """The version, its parents (continue) and the versions merged below it (stack), in version order."""
    versions = {v.version: v for v in AdapterHistory.load(run).versions}
    todo, visited, lineage = [version], set(), []
    while todo:
        v = todo.pop()
        if v in visited or v not in versions:
            continue
        visited.add(v)
        entry = versions[v]
        lineage.append(entry)
        todo += [p for p in [entry.parent, *entry.stack] if isinstance(p, int)]
    return sorted(lineage, key=lambda e: e.version or 0)


def _with_source(cfg: RunConfig, source: Any) -> dict[str, Any]:
    """The run's data settings reading ``source`` instead (no separate validation or test files)."""
    return {**cfg.data.model_dump(mode="json"), "source": source, "val_source": None, "test_source": None}


def earlier_datasets(
    cfg: RunConfig, run: RunDir, target: Target, current_key: str | None, warn: Warn = lambda message: None
) -> list[tuple[str, DataSection]]:
    """(label, data settings) of every dataset the target's adapter lineage was trained on, except the current one,
    then ``eval.retention_sources``."""
    out: list[tuple[str, DataSection]] = []
    seen = {current_key, source_label(cfg.data.source)} - {None}  # a dataset is its content or its source
    lineage = _lineage(run, target.meta.version) if cfg.eval.retention and target.meta.version is not None else []
    for entry in lineage:
        data = entry.data or {}
        if not data.get("source") or data.get("cache_key") in seen or source_label(data["source"]) in seen:
            continue
        seen |= {data.get("cache_key"), source_label(data["source"])}
        settings = data.get("config") or _with_source(cfg, data["source"])
        try:
            out.append((f"v{entry.version}: {source_label(data['source'])}", DataSection.model_validate(settings)))
        except ValidationError as e:  # written by another loratui version
            warn(
                f"retention: skipping v{entry.version}: its stored data settings no longer validate "
                f"({e.error_count()} problems)"
            )
    for source in cfg.eval.retention_sources:
        if source_label(source) in seen:
            continue
        seen.add(source_label(source))
        out.append((f"retention: {source_label(source)}", DataSection.model_validate(_with_source(cfg, source))))
    return out


def _retention_sets(
    cfg: RunConfig,
    run: RunDir,
    target: Target,
    manifest: dict[str, Any],
    inputs: Any,
    task: str,
    events: EventSink,
    should_stop: ShouldStop,
    warn: Warn,
) -> list[EvalSet]:
    """The earlier datasets to re-score, built (or found) in the data cache; never written into this run."""
    from loratui.pipeline.data.build import build_cached
    from loratui.pipeline.data.manifest import DatasetManifest
    from loratui.pipeline.data.read import split_files

    out = []
    data_events = EventSink("data", events.writers)
    for name, data in earlier_datasets(cfg, run, target, manifest.get("cache_key"), warn):
        other = cfg.model_copy(update={"data": data})
        try:
            cached, _ = build_cached(other, split_files(other), inputs, data_events, should_stop)
        except StepCancelled:
            raise
        except LoratuiError as e:  # a dataset that moved away: say so, score the rest
            warn(f"retention: cannot load {name}: {e}")
            continue
        other_manifest = DatasetManifest.load(cached).model_dump(mode="json", exclude_unset=True)
        split = pick_split(other_manifest, cfg.eval.split, name, events, fallback_train=True)
        out.append(_eval_set(name, data, split, cached, other_manifest, cfg, task, inputs))
        events.log(f"retention: also scoring {name} ({split} split, {len(out[-1].examples)} rows)")
    return out


def _eval_set(
    name: str,
    data: DataSection,
    split: str,
    folder: Path,
    manifest: dict[str, Any],
    cfg: RunConfig,
    task: str,
    inputs: Any,
) -> EvalSet:
    """The rows of ``split`` of the processed data in ``folder``."""
    examples = load_examples(
        folder / manifest["splits"][split],
        task,
        inputs.tokenizer,
        inputs.template,
        cfg.eval.fact_field,
        cfg.eval.max_samples,
        manifest.get("preference", "none"),
    )
    return EvalSet(name, split_source(data, split), split, examples, manifest.get("preference", "none"))


def _with_adapter(model: Any, target: Target, base_dir: Path) -> Any:
    from loratui.pipeline.eval.runtimes import apply_adapter

    try:
        return apply_adapter(model, target.path, target.stack)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise LoratuiError(
            f"{target.path} does not fit the base model {base_dir}: its weight shapes differ",
            hint="Evaluate with the model.base the adapter was trained on "
            f"(its loratui.json says {target.meta.base or 'unknown'}).",
        ) from None


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self, events: EventSink, total: int, task: str):
        self.events, self.total, self.task, self.done = events, total, task, 0
        events.progress(0, total, task=task, unit="rows")

    def __call__(self, n: int) -> None:
        self.done += n
        self.events.progress(self.done, self.total, task=self.task, unit="rows")


def _generation_scores(
    model: Any,
    s: EvalSet,
    result: Scores,
    task: str,
    cfg: RunConfig,
    tokenizer: Any,
    events: EventSink,
    should_stop: ShouldStop,
) -> None:
    """Generate a reply to every prompted row of ``s`` and score it against the reference, into ``result``;
    ``task`` names the progress."""
    # an unpaired preference row's bad completion is no reference, but its prompt is answered for comparison.md
    prompted = [
        i
        for i, e in enumerate(s.examples)
        if e.prompt_ids is not None and (e.reference is not None or e.preference_label == 0)
    ]
    if not prompted:
        return
    ids = model.generate(
        [s.examples[i].prompt_ids for i in prompted],
        cfg.eval.max_new_tokens,
        progress=_Counter(events, len(prompted), task),
        should_stop=should_stop,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    for i, text in zip(prompted, texts):
        result.replies[i] = text
    scored = [(i, text) for i, text in zip(prompted, texts) if s.examples[i].reference is not None]
    refs = [s.examples[i].reference or "" for i, _ in scored]
    rows = M.per_row([t for _, t in scored], refs, [s.examples[i].fact for i, _ in scored])
    for (i, _), row in zip(scored, rows):
        result.rows[i] = row
    if scored:
        result.metrics.update(M.aggregate(rows, [t for _, t in scored], refs))
    result.generated = len(prompted)


def _loss_scores(model: Any, s: EvalSet, result: Scores, task: str, events: EventSink, should_stop: ShouldStop) -> None:
    """Loss and perplexity of the trained tokens of ``s`` (of a preference set: its chosen replies), into
    ``result``; ``task`` names the progress. A preference set keeps each row's log-probability."""
    from loratui.pipeline.eval.preference import loss_rows

    pairs = model.nll(s.examples, progress=_Counter(events, len(s.examples), task), should_stop=should_stop)
    if s.preference != "none":
        result.chosen_logp = [-p[0] for p in pairs]
    kept = [p for p, keep in zip(pairs, loss_rows(s.examples)) if keep]
    total, tokens = sum(p[0] for p in kept), sum(p[1] for p in kept)
    if tokens:
        result.metrics.update(M.loss_metrics(total, tokens))
        result.scored_tokens = tokens


def score(
    model: Any,
    label: str,
    sets: list[EvalSet],
    cfg: RunConfig,
    tokenizer: Any,
    events: EventSink,
    should_stop: ShouldStop,
    base: dict[str, Scores] | None = None,
) -> dict[str, Scores]:
    """Every wanted metric of ``model`` on every set. ``label`` is ``base`` or ``tuned``; ``base``: the base
    model's scores, for the tuned model's unpaired preference metrics."""
    from loratui.pipeline.eval import preference

    wanted = set(cfg.eval.metrics)
    generate = bool(wanted & set(M.GENERATION_METRICS))
    loss = bool(wanted & set(M.LOSS_METRICS))
    prefer = bool(wanted & set(M.PREFERENCE_METRICS))
    out: dict[str, Scores] = {}
    for s in sets:
        result = Scores(replies=[None] * len(s.examples), rows=[None] * len(s.examples))
        where = "" if s.name == "main" else f" ({s.name})"
        if generate:
            _generation_scores(model, s, result, f"{label}: generate{where}", cfg, tokenizer, events, should_stop)
        if loss and s.examples:
            _loss_scores(model, s, result, f"{label}: loss{where}", events, should_stop)
        if prefer:
            preference.score_set(
                model,
                s,
                result,
                (base or {}).get(s.name),
                label,
                where,
                lambda task, n: _Counter(events, n, task),
                events.log,
                should_stop,
            )
        result.metrics = {k: v for k, v in result.metrics.items() if k in wanted}
        events.metric(
            {k: float(v) for k, v in result.metrics.items()},
            split=f"{label}" + ("" if s.name == "main" else f"@{s.name}"),
        )
        out[s.name] = result
    return out


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """What one evaluation scores, and where."""

    target: Target
    manifest: dict[str, Any]
    inputs: Any  # the data step's ModelInputs: tokenizer and chat template
    task: str
    split: str
    sets: list[EvalSet]


def _prepare(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> _Job:
    """The target, the run's data and the sets to score: the run's own split, then the retention sets."""
    from loratui.pipeline.data.prepare import prepare
    from loratui.pipeline.models import load_model_inputs

    target = resolve_target(cfg, run)
    manifest = prepare(cfg, run, events, should_stop)
    inputs = load_model_inputs(cfg, events)
    task = manifest.get("task", "causal")
    split = pick_split(manifest, cfg.eval.split, str(run.data), events, fallback_train=False)
    sets = [_eval_set("main", cfg.data, split, run.data, manifest, cfg, task, inputs)]
    warn: Warn = lambda message: events.log(message, level="warning")  # noqa: E731
    trained = target.meta.data or {}
    if trained.get("cache_key") not in (None, manifest.get("cache_key")) and source_label(
        trained.get("source")
    ) == source_label(cfg.data.source):
        warn(
            "the data settings differ from the ones the adapter was trained with (seed, ratios, template...): "
            "the test split may hold rows it was trained on"
        )
    sets += _retention_sets(cfg, run, target, manifest, inputs, task, events, should_stop, warn)
    return _Job(target, manifest, inputs, task, split, sets)


def _score_models(
    cfg: RunConfig, job: _Job, device: str, precision: str, events: EventSink, should_stop: ShouldStop
) -> dict[str, dict[str, Scores]]:
    """``base`` (when compared) and ``tuned`` on every set."""
    import torch

    from loratui.pipeline.eval.runtimes import TorchModel, load_torch
    from loratui.pipeline.train.history import check_adapter_base

    tokenizer, target, task = job.inputs.tokenizer, job.target, job.task
    stop = stop_ids(tokenizer, job.sets)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def scored(model: Any, name: str) -> dict[str, Scores]:
        wrapped = TorchModel(
            model, name=name, task=task, pad_id=int(pad), stop_ids=stop, batch_size=cfg.eval.batch_size
        )
        return score(wrapped, name, job.sets, cfg, tokenizer, events, should_stop, base=results.get("base"))

    base_dir = Path(job.manifest["model_dir"])
    if target.kind == "adapter":
        check_adapter_base(target.meta, target.path, cfg.model.base, base_dir)
    results: dict[str, dict[str, Scores]] = {}
    try:
        model = None
        if cfg.eval.compare_base or target.kind == "adapter":
            model = load_torch(base_dir, task, device, precision, cfg.model.trust_remote_code)
        if cfg.eval.compare_base:  # first: a stack target merges adapters into these weights
            results["base"] = scored(model, "base")
        if target.kind == "adapter":
            tuned = _with_adapter(model, target, base_dir)
        else:
            del model
            tuned = load_torch(target.path, task, device, precision, cfg.model.trust_remote_code)
        results["tuned"] = scored(tuned, "tuned")
    except StopRequested:
        raise StepCancelled("evaluation cancelled; nothing was written") from None
    except torch.cuda.OutOfMemoryError:
        raise LoratuiError(
            f"CUDA ran out of memory while evaluating with eval.batch_size={cfg.eval.batch_size}",
            hint="Lower eval.batch_size or eval.max_new_tokens.",
        ) from None
    return results


def _summary(job: _Job, results: dict[str, dict[str, Scores]], started: float) -> dict[str, Any]:
    main = {m: s["main"].metrics for m, s in results.items()}
    summary: dict[str, Any] = {
        "samples": len(job.sets[0].examples),
        "split": job.split,
        "tuned": main["tuned"],
        "seconds": round(time.monotonic() - started, 2),
    }
    if "base" in main:
        summary["base"] = main["base"]
        summary["delta"] = M.deltas(main["tuned"], main["base"])
    if len(job.sets) > 1:
        summary["retention"] = {s.name: results["tuned"][s.name].metrics for s in job.sets[1:]}
    return summary


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    from loratui.pipeline import device as devices
    from loratui.pipeline.eval import report
    from loratui.pipeline.train.quiet import quiet_bitsandbytes
    from loratui.pipeline.train.settings import resolve_device, resolve_precision

    quiet_bitsandbytes()  # before peft imports bitsandbytes
    started = time.monotonic()
    job = _prepare(cfg, run, events, should_stop)
    hw = devices.probe()  # the same choice as training: train.device and train.precision
    chosen = resolve_device(cfg, hw)
    device, precision = chosen.value, resolve_precision(cfg, chosen.value, hw).value
    events.log(f"evaluating on {device} ({chosen.reason}) in {precision}")
    if device == "mps":
        devices.enable_mps_fallback(events.log)
    results = _score_models(cfg, job, device, precision, events, should_stop)
    target = job.target
    info = {
        "run": cfg.name,
        "base": str(Path(job.manifest["model_dir"])),
        "target": {
            "kind": target.kind,
            "path": str(target.path),
            "stack": [str(p) for p in target.stack],
            "version": target.meta.version,
        },
        "device": device,
        "precision": precision,
        "decoding": {"strategy": "greedy", "max_new_tokens": cfg.eval.max_new_tokens},
        "metrics_wanted": list(cfg.eval.metrics),
    }
    with atomic_dir(run.eval) as tmp:
        written = report.write_all(Path(tmp), job.sets, results, info, cfg, run)
    for name, kind in written:
        events.artifact(run.eval / name, kind=kind)
    summary = _summary(job, results, started)
    for line in report.summary_lines(job.sets, results):
        events.log(line)
    return StepResult(summary=summary, artifacts=[str(run.eval / "metrics.json"), str(run.eval / "metrics.csv")])
