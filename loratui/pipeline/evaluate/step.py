"""The evaluate step: the tuned model against the base model on held-out data, written to ``runs/<name>/eval/``.

```
eval/metrics.json      every figure: per model, per dataset, with deltas (tuned - base)
eval/metrics.csv       one row per model and dataset: rouge1 ... bleu, exact_match, token_f1, contains, loss, perplexity
eval/comparison.md     the table, then side-by-side replies (prompt, reference, base, tuned), worst cases first
eval/generations.jsonl every reply with its per-row scores
eval/plots/*.png       loss curves of the training run, base vs tuned bars, retention bars
```
Retention: after ``continue`` or ``stack`` training the adapter's history names earlier datasets;
each is re-scored (base and tuned), so a user sees whether the old topic is still answered.

The metrics talk to a model through :class:`~loratui.pipeline.evaluate.runtimes.EvalModel`; this
step uses the PyTorch implementation (an adapter on its base, or a merged directory).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loratui.pipeline.config import DataSection, RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.evaluate import metrics as M
from loratui.pipeline.evaluate.runtimes import Example, StopRequested, artifact_kind
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_dir
from loratui.pipeline.steps import ShouldStop, StepResult

IGNORE = -100


@dataclass
class EvalSet:
    """The rows of one dataset split to score."""

    name: str  # "main" for the run's own data, else the earlier dataset's source
    source: str
    split: str
    examples: list[Example]


@dataclass
class Scores:
    """One model on one dataset."""

    metrics: dict[str, float] = field(default_factory=dict)
    replies: list[str | None] = field(default_factory=list)  # per example; None: not generated
    rows: list[dict[str, float] | None] = field(default_factory=list)  # per-example generation metrics
    generated: int = 0
    scored_tokens: int = 0


@dataclass
class Target:
    """What is evaluated: an adapter (with adapters merged below it for stack runs) or a merged model."""

    kind: str  # adapter | model
    path: Path
    stack: list[Path]
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def load_examples(
    split_dir: Path, task: str, tokenizer: Any, template: Any, fact_field: str, limit: int | None
) -> list[Example]:
    """Evaluation rows from a processed split of the data step.

    Loss is scored on the tokens exactly as trained. A chat row whose last message is the assistant's
    is also a generation prompt: the conversation before that reply, rendered with the same chat
    template and ``add_generation_prompt`` (causal), or the encoder input (seq2seq). Raw text rows
    and document chunks are scored for loss only.
    """
    from datasets import load_from_disk

    from loratui.pipeline.data.encode import clean_backend, seq2seq_texts

    ds = load_from_disk(str(split_dir))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    backend = clean_backend(tokenizer) if task == "causal" else None
    out: list[Example] = []
    for row in ds:
        messages = json.loads(row["messages"]) if row.get("messages") else []
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        fact = meta.get(fact_field) if isinstance(meta, dict) else None
        e = Example(
            input_ids=list(row["input_ids"]),
            labels=list(row["labels"]),
            source=row.get("source") or "",
            fact=str(fact) if fact not in (None, "") else None,
        )
        if messages and messages[-1]["role"] == "assistant" and not row.get("chunk"):
            e.reference = messages[-1]["content"]
            if task == "seq2seq":
                e.prompt, _ = seq2seq_texts(messages)
                e.prompt_ids = list(row["input_ids"])
            else:
                text = template.reply_prompt(messages)
                assert backend is not None  # a causal model's tokenizer
                e.prompt_ids = backend.encode(text, add_special_tokens=False).ids
                e.prompt = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), text)
        out.append(e)
    return out


def stop_ids(tokenizer: Any, sets: list[EvalSet]) -> set[int]:
    """Tokens that end a reply: EOS and every special token inside the trained replies.

    The data step ends an assistant turn with the template's end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``) and EOS where the two differ; a base model that never learned the pair must stop
    at the first of them, not write further turns until ``max_new_tokens``.
    """
    stop = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    for s in sets:
        for e in s.examples:
            if e.reference is not None:
                stop |= {int(t) for t in e.labels if t != IGNORE and t in special}
    return stop


def pick_split(manifest: dict[str, Any], want: str, where: str, events: EventSink, fallback_train: bool) -> str:
    splits = manifest["splits"]
    order = [want, "validation" if want == "test" else "test"] + (["train"] if fallback_train else [])
    for split in order:
        if split in splits:
            if split != want:
                events.log(f"{where}: no {want} split, scoring the {split} split instead", level="warning")
            return split
    raise LoratuiError(
        f"{where}: the data has no test or validation split to evaluate on",
        hint="Set data.test_ratio (for example 0.1) or data.test_source, then run the step again.",
    )


# --------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------


def resolve_target(cfg: RunConfig, run: RunDir) -> Target:
    from loratui.pipeline.train.history import adapter_meta

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
    meta = adapter_meta(path) if kind == "adapter" else {}
    if meta and not _inside(path, run.path):  # its version numbers belong to another run's history
        meta = {k: v for k, v in meta.items() if k != "version"}
    stack = [Path(p) for p in meta.get("stack_paths", [])]
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


def earlier_datasets(
    cfg: RunConfig, run: RunDir, target: Target, current_key: str | None, warn: Any = lambda message: None
) -> list[tuple[str, DataSection]]:
    """(label, data settings) of every dataset the target's adapter lineage was trained on, except the current one,
    then ``eval.retention_sources``."""
    from loratui.pipeline.train.history import load_history

    out: list[tuple[str, DataSection]] = []
    seen = {current_key, _label(cfg.data.source)} - {None}  # a dataset is its content or its source
    if cfg.eval.retention and target.meta.get("version") is not None:
        versions = {v["version"]: v for v in load_history(run)["versions"]}
        todo, visited, lineage = [target.meta["version"]], set(), []
        while todo:  # the adapter, its parents (continue) and the versions merged below it (stack)
            v = todo.pop()
            if v in visited or v not in versions:
                continue
            visited.add(v)
            entry = versions[v]
            lineage.append(entry)
            todo += [p for p in [entry.get("parent"), *entry.get("stack", [])] if isinstance(p, int)]
        for entry in sorted(lineage, key=lambda e: e["version"]):
            data = entry.get("data") or {}
            if not data.get("source") or data.get("cache_key") in seen or _label(data["source"]) in seen:
                continue
            seen |= {data.get("cache_key"), _label(data["source"])}
            settings = data.get("config") or {
                **cfg.data.model_dump(mode="json"),
                "source": data["source"],
                "val_source": None,
                "test_source": None,
            }
            try:
                out.append((f"v{entry['version']}: {_label(data['source'])}", DataSection.model_validate(settings)))
            except ValidationError as e:  # written by another loratui version
                warn(
                    f"retention: skipping v{entry['version']}: its stored data settings no longer validate "
                    f"({e.error_count()} problems)"
                )
    for source in cfg.eval.retention_sources:
        if _label(source) in seen:
            continue
        seen.add(_label(source))
        settings = {**cfg.data.model_dump(mode="json"), "source": source, "val_source": None, "test_source": None}
        out.append((f"retention: {_label(source)}", DataSection.model_validate(settings)))
    return out


def _label(source: Any) -> str:
    return ", ".join(source) if isinstance(source, list) else str(source)


def split_source(data: DataSection, split: str) -> str:
    """Where the rows of ``split`` come from: ``data.test_source`` / ``data.val_source`` when they name their own
    files, else ``data.source`` (the split is held out from it, or shipped with a bundled dataset)."""
    own = {"test": data.test_source, "validation": data.val_source}.get(split)
    return _label(own) if own else _label(data.source)


def _retention_sets(
    cfg: RunConfig,
    run: RunDir,
    target: Target,
    manifest: dict[str, Any],
    inputs: Any,
    task: str,
    events: EventSink,
    should_stop: ShouldStop,
    warn: Any,
) -> list[EvalSet]:
    """The earlier datasets to re-score, built (or found) in the data cache; never written into this run."""
    from loratui.pipeline.data.step import build_cached, split_files

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
        other_manifest = json.loads((cached / "dataset.json").read_text(encoding="utf-8"))
        split = pick_split(other_manifest, cfg.eval.split, name, events, fallback_train=True)
        out.append(
            EvalSet(
                name,
                split_source(data, split),
                split,
                load_examples(
                    cached / other_manifest["splits"][split],
                    task,
                    inputs.tokenizer,
                    inputs.template,
                    cfg.eval.fact_field,
                    cfg.eval.max_samples,
                ),
            )
        )
        events.log(f"retention: also scoring {name} ({split} split, {len(out[-1].examples)} rows)")
    return out


def _with_adapter(model: Any, target: Target, base_dir: Path) -> Any:
    from loratui.pipeline.evaluate.runtimes import apply_adapter

    try:
        return apply_adapter(model, target.path, target.stack)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise LoratuiError(
            f"{target.path} does not fit the base model {base_dir}: its weight shapes differ",
            hint="Evaluate with the model.base the adapter was trained on "
            f"(its loratui.json says {target.meta.get('base', 'unknown')}).",
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


def score(
    model: Any,
    label: str,
    sets: list[EvalSet],
    cfg: RunConfig,
    tokenizer: Any,
    events: EventSink,
    should_stop: ShouldStop,
) -> dict[str, Scores]:
    """Every wanted metric of ``model`` on every set."""
    wanted = set(cfg.eval.metrics)
    generate = bool(wanted & set(M.GENERATION_METRICS))
    loss = bool(wanted & set(M.LOSS_METRICS))
    out: dict[str, Scores] = {}
    for s in sets:
        result = Scores(replies=[None] * len(s.examples), rows=[None] * len(s.examples))
        prompted = [i for i, e in enumerate(s.examples) if e.prompt_ids is not None and e.reference is not None]
        where = "" if s.name == "main" else f" ({s.name})"
        if generate and prompted:
            ids = model.generate(
                [s.examples[i].prompt_ids for i in prompted],
                cfg.eval.max_new_tokens,
                progress=_Counter(events, len(prompted), f"{label}: generate{where}"),
                should_stop=should_stop,
            )
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
            refs = [s.examples[i].reference or "" for i in prompted]
            facts = [s.examples[i].fact for i in prompted]
            rows = M.per_row(texts, refs, facts)
            for i, text, row in zip(prompted, texts, rows):
                result.replies[i], result.rows[i] = text, row
            result.metrics.update(M.aggregate(rows, texts, refs))
            result.generated = len(prompted)
        if loss and s.examples:
            pairs = model.nll(
                s.examples, progress=_Counter(events, len(s.examples), f"{label}: loss{where}"), should_stop=should_stop
            )
            total, tokens = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            if tokens:
                result.metrics.update(M.loss_metrics(total, tokens))
                result.scored_tokens = tokens
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


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    from loratui.pipeline.data.step import load_model_inputs, prepare
    from loratui.pipeline.evaluate import report
    from loratui.pipeline.evaluate.runtimes import TorchModel, load_torch
    from loratui.pipeline.train.history import check_adapter_base
    from loratui.pipeline.train.quiet import quiet_bitsandbytes
    from loratui.pipeline.train.settings import resolve_device, resolve_precision

    quiet_bitsandbytes()  # before peft imports bitsandbytes
    started = time.monotonic()
    target = resolve_target(cfg, run)
    manifest = prepare(cfg, run, events, should_stop)
    inputs = load_model_inputs(cfg, events)
    tokenizer, task = inputs.tokenizer, manifest.get("task", "causal")
    split = pick_split(manifest, cfg.eval.split, str(run.data), events, fallback_train=False)
    sets = [
        EvalSet(
            "main",
            split_source(cfg.data, split),
            split,
            load_examples(
                run.data / manifest["splits"][split],
                task,
                tokenizer,
                inputs.template,
                cfg.eval.fact_field,
                cfg.eval.max_samples,
            ),
        )
    ]
    warn = lambda message: events.log(message, level="warning")  # noqa: E731
    trained = target.meta.get("data") or {}
    if trained.get("cache_key") not in (None, manifest.get("cache_key")) and _label(trained.get("source")) == _label(
        cfg.data.source
    ):
        warn(
            "the data settings differ from the ones the adapter was trained with (seed, ratios, template...): "
            "the test split may hold rows it was trained on"
        )
    sets += _retention_sets(cfg, run, target, manifest, inputs, task, events, should_stop, warn)

    import torch

    cuda = torch.cuda.is_available()
    device = resolve_device(cfg, cuda).value
    precision = resolve_precision(cfg, device, cuda and torch.cuda.is_bf16_supported()).value
    stop = stop_ids(tokenizer, sets)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def wrap(model: Any, name: str) -> TorchModel:
        return TorchModel(model, name=name, task=task, pad_id=int(pad), stop_ids=stop, batch_size=cfg.eval.batch_size)

    base_dir = Path(manifest["model_dir"])
    if target.kind == "adapter":
        check_adapter_base(target.meta, target.path, cfg.model.base, base_dir)
    results: dict[str, dict[str, Scores]] = {}
    try:
        model = None
        if cfg.eval.compare_base or target.kind == "adapter":
            model = load_torch(base_dir, task, device, precision, cfg.model.trust_remote_code)
        if cfg.eval.compare_base:  # first: a stack target merges adapters into these weights
            results["base"] = score(wrap(model, "base"), "base", sets, cfg, tokenizer, events, should_stop)
        if target.kind == "adapter":
            tuned = _with_adapter(model, target, base_dir)
        else:
            del model
            tuned = load_torch(target.path, task, device, precision, cfg.model.trust_remote_code)
        results["tuned"] = score(wrap(tuned, "tuned"), "tuned", sets, cfg, tokenizer, events, should_stop)
    except StopRequested:
        raise StepCancelled("evaluation cancelled; nothing was written") from None
    except torch.cuda.OutOfMemoryError:
        raise LoratuiError(
            f"CUDA ran out of memory while evaluating with eval.batch_size={cfg.eval.batch_size}",
            hint="Lower eval.batch_size or eval.max_new_tokens.",
        ) from None

    info = {
        "run": cfg.name,
        "base": str(base_dir),
        "target": {
            "kind": target.kind,
            "path": str(target.path),
            "stack": [str(p) for p in target.stack],
            "version": target.meta.get("version"),
        },
        "device": device,
        "precision": precision,
        "decoding": {"strategy": "greedy", "max_new_tokens": cfg.eval.max_new_tokens},
        "metrics_wanted": list(cfg.eval.metrics),
    }
    with atomic_dir(run.eval) as tmp:
        written = report.write_all(Path(tmp), sets, results, info, cfg, run)
    for name, kind in written:
        events.artifact(run.eval / name, kind=kind)
    main = {m: s["main"].metrics for m, s in results.items()}
    summary: dict[str, Any] = {
        "samples": len(sets[0].examples),
        "split": split,
        "tuned": main["tuned"],
        "seconds": round(time.monotonic() - started, 2),
    }
    if "base" in main:
        summary["base"] = main["base"]
        summary["delta"] = M.deltas(main["tuned"], main["base"])
    if len(sets) > 1:
        summary["retention"] = {s.name: results["tuned"][s.name].metrics for s in sets[1:]}
    for line in report.summary_lines(sets, results):
        events.log(line)
    return StepResult(summary=summary, artifacts=[str(run.eval / "metrics.json"), str(run.eval / "metrics.csv")])
