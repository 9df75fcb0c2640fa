"""The train step: a PEFT adapter from the data step's token datasets, with the transformers Trainer.

Writes ``runs/<name>/adapter/`` (the current adapter, PEFT format), ``adapters/vN/`` (every
version, see :mod:`~loratui.pipeline.train.history`) and ``checkpoints/checkpoint-<step>/``.
SIGTERM saves a checkpoint at the next optimizer step and ends with ``cancelled``;
``train.resume`` continues from it exactly (model, optimizer, scheduler, RNG, data order).

The recipe: :func:`prepare` (data, settings, lineage) -> :func:`fit_with_retry` (halving the micro-batch
after running out of memory) -> :func:`record_version`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.data.prepare import prepare as prepare_data
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.estimate.data import DataFacts
from loratui.pipeline.estimate.plan import estimate_for, memory_tokens, run_facts
from loratui.pipeline.estimate.record import Estimate
from loratui.pipeline.events import EventSink, JsonlWriter
from loratui.pipeline.runs import RunDir, write_config
from loratui.pipeline.steps import WORKER_ENV, ShouldStop, StepResult
from loratui.pipeline.train import history as hist
from loratui.pipeline.train import objectives, settings, topology
from loratui.pipeline.train.arguments import FitInputs, fit
from loratui.pipeline.train.checkpoints import latest_checkpoint, resolve_resume, settings_of_checkpoint
from loratui.pipeline.train.model import add_adapter, check_family, free_gib, is_oom, load_base, wants_padding_free
from loratui.pipeline.train.quiet import quiet_bitsandbytes


@dataclass
class Prepared:
    """Everything a training run settled before the first model is loaded."""

    cfg: RunConfig
    rank: int
    world: int
    manifest: dict[str, Any]
    model_dir: Path
    task: str
    resolved: settings.Resolved
    resume: Path | None
    inputs: FitInputs
    parent_path: Path | None = None
    parent: hist.AdapterVersion = field(default_factory=hist.AdapterVersion)
    stack: list[Path] = field(default_factory=list)  # adapters merged into the base, in order
    init_from: Path | None = None  # continue: the adapter trained further
    estimate: Estimate | None = None  # what the run was expected to take (the first process only)

    def log(self, events: EventSink) -> EventSink | None:
        """``events`` on the first process, None on the others (one process reports)."""
        return events if self.rank == 0 else None


def _parent_adapter(cfg: RunConfig, run: RunDir) -> tuple[Path, hist.AdapterVersion]:
    """The adapter that continue/stack starts from, and its provenance."""
    if cfg.lora.init_from:
        path = Path(cfg.lora.init_from)
        if not (path / "adapter_config.json").is_file():
            raise LoratuiError(f"lora.init_from: {path} is not a PEFT adapter folder (no adapter_config.json)")
        return path, hist.AdapterVersion.load(path) or hist.AdapterVersion()
    current = hist.current_version(run)
    if current is None or current.version is None or not (run.adapter / "adapter_config.json").is_file():
        raise LoratuiError(
            f"train.mode={cfg.train.mode}: {run.path} has no trained adapter yet",
            hint="Train once with train.mode=fresh (or set lora.init_from to an adapter folder).",
        )
    return hist.version_dir(run, current.version), current


def _lineage(prep: Prepared, run: RunDir) -> None:
    """The parent adapter of a continue/stack run, the adapters below it, and what training starts from."""
    mode = prep.cfg.train.mode
    if mode == "fresh":
        return
    prep.parent_path, prep.parent = _parent_adapter(prep.cfg, run)
    prep.stack = prep.parent.stack_folders()  # merged into the base of the parent
    if mode == "stack":
        prep.stack.append(prep.parent_path)
    elif mode == "continue":
        prep.init_from = prep.parent_path


def _resolve_settings(
    cfg: RunConfig, run: RunDir, events: EventSink, facts: DataFacts, world: int, rank: int, fit: tuple[Path, bool]
) -> tuple[settings.Resolved, Path | None, settings.Resolution, str]:
    """(the resolved auto settings, the checkpoint to resume, device, precision); written to config.yaml.

    ``fit``: the model folder and whether batches are padding-free, for the memory model that bounds an
    ``auto`` micro-batch."""
    from loratui.pipeline import device as devices

    hw = devices.probe()
    device = settings.resolve_device(cfg, hw)
    precision = settings.resolve_precision(cfg, device.value, hw)
    warnings = devices.training_rules(device.value, cfg.lora.method, cfg.train.optimizer, world, cfg.train.distributed)
    if rank == 0:
        for warning in warnings:
            events.log(warning, level="warning")
        if device.value == "mps":
            devices.enable_mps_fallback(events.log)
    budget = None
    if cfg.train.batch_size == "auto":
        try:
            budget = memory_tokens(cfg, fit[0], facts, device.value, precision.value, fit[1])
        except Exception as e:  # noqa: BLE001  the rule of thumb decides instead
            events.log(f"auto micro-batch without the memory model ({type(e).__name__}: {e})", level="warning")
    resolved = settings.resolve_auto(
        cfg, facts.lengths, device=device.value, nproc=world, free_gib=free_gib(), memory_tokens=budget
    )
    resume = resolve_resume(cfg, run)
    if resume is not None:  # a resumed run keeps the settings it started with
        resolved = settings_of_checkpoint(resume, resolved)
    settings.apply(cfg, resolved)
    cfg.train.resume = False  # how this invocation started, not a setting of the run
    if rank == 0:
        write_config(run.config, cfg)
        events.log(f"device {device.value} ({device.reason}); precision {precision.value} ({precision.reason})")
        for line in resolved.lines():
            events.log(f"setting {line}")
    return resolved, resume, device, precision.value


def prepare(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> Prepared:
    """The data, the resolved settings, the checkpoint to resume and the adapter lineage of this run."""
    from transformers import AutoTokenizer

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get(WORKER_ENV):  # the launcher ran the data step before starting the processes
        manifest = DatasetManifest.load(run.data).model_dump(mode="json", exclude_unset=True)
    else:
        manifest = prepare_data(cfg, run, events, should_stop)
    task = manifest.get("task", "causal")
    model_dir = Path(manifest["model_dir"])
    objectives.check_objective(cfg, manifest.get("preference", "none"), task)
    train_ds, val_ds = objectives.load_splits(run.data, manifest, cfg.train.objective)
    facts = run_facts(run, objectives.row_lengths(train_ds))
    check_family(cfg, model_dir, events if rank == 0 else None)
    padding_free = wants_padding_free(cfg, model_dir, task, events if rank == 0 else None)
    resolved, resume, device, precision = _resolve_settings(
        cfg, run, events, facts, world, rank, (model_dir, padding_free)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    inputs = FitInputs(tokenizer, train_ds, val_ds, device.value, precision, padding_free)
    prep = Prepared(cfg, rank, world, manifest, model_dir, task, resolved, resume, inputs)
    _lineage(prep, run)
    if rank == 0:
        prep.estimate = _announce_estimate(prep, facts, device, events)
    return prep


def _announce_estimate(
    prep: Prepared, facts: DataFacts, device: settings.Resolution, events: EventSink
) -> Estimate | None:
    """The estimate panel before the first step (also in events.jsonl); a model it cannot read only warns."""
    try:
        found = estimate_for(
            prep.cfg,
            prep.model_dir,
            facts,
            prep.resolved,
            (device.value, device.reason),
            prep.inputs.precision,
            prep.inputs.padding_free,
        )
    except LoratuiError as e:
        events.log(f"no estimate for this run: {e.message}", level="warning")
        return None
    except Exception as e:  # noqa: BLE001  the estimate informs; a fault in it must not stop the training
        events.log(f"no estimate for this run ({type(e).__name__}: {e}); training goes on", level="warning")
        return None
    events.log(f"estimate: {found.verdict()}", estimate=found.model_dump(mode="json"))
    return found


def _load_model(prep: Prepared, events: EventSink) -> Any:
    """The base with its stack merged and the adapter added, from the run's seed."""
    from transformers import set_seed

    cfg, inputs = prep.cfg, prep.inputs
    set_seed(cfg.train.seed)  # the adapter's initial weights depend on it
    model = load_base(
        cfg, prep.model_dir, prep.task, inputs.device, inputs.precision, inputs.padding_free, prep.stack, events
    )
    model = add_adapter(cfg, model, prep.task, prep.resolved, prep.init_from)
    if prep.rank == 0:
        trainable, total = model.get_nb_trainable_parameters()
        events.log(
            f"adapter: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
            f"{'padding-free batches' if inputs.padding_free else 'padded batches'}"
        )
    return model


def _halve_micro_batch(prep: Prepared, run: RunDir, events: EventSink) -> None:
    """After running out of memory: half the micro-batch, twice the accumulation, from the last checkpoint."""
    cfg, resolved = prep.cfg, prep.resolved
    micro, accum = resolved["train.batch_size"], resolved["train.grad_accum"]
    if micro == 1:
        raise LoratuiError(
            "out of memory at micro-batch 1",
            hint="Use lora.method=qlora, a shorter "
            "data.max_length, train.gradient_checkpointing=true, or a larger GPU.",
        ) from None
    micro, accum = micro // 2, accum * 2
    resolved.set("train.batch_size", micro, "halved after running out of memory")
    resolved.set("train.grad_accum", accum, "doubled after running out of memory (same effective batch)")
    settings.apply(cfg, resolved)
    if prep.rank == 0:
        write_config(run.config, cfg)
    prep.resume = latest_checkpoint(run.checkpoints)
    events.log(
        f"out of memory: retrying with micro-batch {micro} x accumulation {accum}"
        + (f", from {prep.resume.name}" if prep.resume else ""),
        level="warning",
    )


def fit_with_retry(prep: Prepared, run: RunDir, events: EventSink, should_stop: ShouldStop) -> tuple[Any, Any]:
    """Fit; with ``train.oom_fallback``, an out-of-memory error retries at half the micro-batch."""
    import torch

    while True:
        model = _load_model(prep, events)
        try:
            return fit(prep.cfg, run, events, should_stop, model, prep.inputs, prep.resolved, prep.resume)
        except Exception as e:
            if not (prep.cfg.train.oom_fallback and is_oom(e)):
                raise
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            elif torch.backends.mps.is_available():
                torch.mps.empty_cache()
            _halve_micro_batch(prep, run, events)


def _version_entry(prep: Prepared, run: RunDir, trainer: Any, started: float) -> hist.AdapterVersion:
    """The provenance record of the adapter just trained."""
    cfg, parent, mode = prep.cfg, prep.parent, prep.cfg.train.mode
    curve = hist.curve_of(trainer.state.log_history)  # the whole run: a resume restored the steps before it
    losses = [loss for _, loss in curve["train"]]
    evals = [loss for _, loss in curve["eval"]]
    train_seconds = max(trainer.state.log_history[-1].get("train_runtime", time.monotonic() - started), 1e-9)
    tokens = trainer.tokens_seen * prep.world
    parent_name = parent.version if parent.version is not None else str(prep.parent_path)
    return hist.AdapterVersion(
        version=hist.AdapterHistory.load(run).next_version(),
        mode=mode,
        parent=parent.version if mode != "fresh" else None,
        stack=[*parent.stack, parent_name] if mode == "stack" else parent.stack,
        stack_paths=[str(p.resolve()) for p in prep.stack],  # absolute: merge and eval may run from elsewhere
        base=cfg.model.base,
        model_dir=str(prep.model_dir),
        task=prep.task,
        data={  # the eval step re-scores it (retention)
            "source": cfg.data.source,
            "cache_key": prep.manifest.get("cache_key"),
            "config": cfg.data.model_dump(mode="json"),
        },
        method=cfg.lora.method,
        objective=cfg.train.objective,
        beta=cfg.train.beta if cfg.train.objective != "sft" else None,
        r=prep.resolved["lora.r"],
        alpha=prep.resolved["lora.alpha"],
        lr=cfg.train.lr,
        epochs=cfg.train.epochs,  # a number: settings.apply resolved "auto"
        max_steps=cfg.train.max_steps,
        effective_batch=cfg.train.effective_batch,
        steps=trainer.state.global_step,
        metrics={
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "eval_loss_best": min(evals) if evals else None,
            "tokens_per_s": round(tokens / train_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "peak_memory_bytes": peak_memory(prep.inputs.device),
            **_preference_figures(trainer.state.log_history),
        },
        estimate=_estimate_summary(prep.estimate),
    )


def _preference_figures(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged reward accuracy and margin (train and validation) of a preference objective."""
    found: dict[str, float] = {}
    for entry in log_history:
        for key in ("reward_accuracy", "reward_margin", "eval_reward_accuracy", "eval_reward_margin"):
            if key in entry:
                found[f"{key}_last"] = round(float(entry[key]), 4)
    return found


def peak_memory(device: str) -> int:
    """The process's peak: resident memory on the CPU, allocated GPU memory on CUDA and MPS."""
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _estimate_summary(found: Estimate | None) -> dict[str, Any] | None:
    """What the report sets beside the measured figures."""
    if found is None:
        return None
    return {
        "source": found.time.source,
        "train_seconds": round(found.time.parts["train"] - found.time.setup_s, 1),  # as the Trainer counts it
        "peak_memory_bytes": found.memory.total,
        "disk_bytes": found.disk.total,
        "device": found.device,
    }


def record_version(
    prep: Prepared, run: RunDir, events: EventSink, trainer: Any, started: float, weights: dict[str, Any] | None = None
) -> StepResult:
    """Keep the trained adapter as the run's next version (and its current one); the step's result.

    ``weights``: the whole model's state gathered from the processes (ZeRO-3), else the model's own."""
    entry = _version_entry(prep, run, trainer, started)
    seconds = round(time.monotonic() - started, 2)
    (run.path / "adapters").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".v{entry.version}-", dir=run.path / "adapters") as tmp:
        if weights is None:
            trainer.model.save_pretrained(tmp)
        else:
            trainer.model.save_pretrained(tmp, state_dict=weights)
        prep.inputs.tokenizer.save_pretrained(tmp)
        curve = hist.curve_of(trainer.state.log_history)
        (Path(tmp) / hist.CURVE).write_text(json.dumps(curve) + "\n", encoding="utf-8")
        hist.record(run, entry, Path(tmp))
    events.artifact(run.adapter, kind="adapter")
    if curve["eval"] and trainer.state.best_metric is not None:
        events.log(
            f"kept the adapter with the lowest eval loss {trainer.state.best_metric:.4f} "
            f"({trainer.state.best_model_checkpoint})"
        )
    summary = {
        "version": entry.version,
        "mode": entry.mode,
        "steps": trainer.state.global_step,
        "train_loss": entry.metrics["train_loss_last"],
        "eval_loss": entry.metrics["eval_loss_best"],
        "tokens": trainer.tokens_seen * prep.world,
        "tokens_per_s": entry.metrics["tokens_per_s"],
        "adapter": str(run.adapter),
        "seconds": seconds,
    }
    return StepResult(summary=summary, artifacts=[str(run.adapter)])


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    quiet_bitsandbytes()
    if os.environ.get(WORKER_ENV):
        _report_for_this_node(events)
        return train(cfg, run, events, should_stop)
    topo = topology.resolve(cfg.train)
    if topo.world > 1:
        from loratui.pipeline.train.launch import run_distributed

        if not topo.leader:
            _leave_the_run_log(events, run)
        result: StepResult = run_distributed(cfg, run, events, should_stop, topo)
        return result
    return train(cfg, run, events, should_stop)


def _leave_the_run_log(events: EventSink, run: RunDir) -> None:
    """The launcher of a node other than node 0: its events go to its own terminal, not into the run's
    events.jsonl, which node 0's launcher writes (one run, one account of it)."""
    for writer in list(events.writers):
        handle = getattr(writer, "_fh", None)
        if isinstance(writer, JsonlWriter) and Path(getattr(handle, "name", "")) == run.events:
            events.writers.remove(writer)
            writer.close()


def _report_for_this_node(events: EventSink) -> None:
    """In a worker: the first process of a node other than node 0 reports on stdout too, so that its node's
    launcher learns how training ended (global rank 0 reports for the run; the others are silent)."""
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if rank != 0 and local == 0 and not any(isinstance(w, JsonlWriter) for w in events.writers):
        events.writers.append(JsonlWriter(sys.stdout))


def train(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    """One training process: prepare -> fit (retried after running out of memory) -> record the version."""
    import warnings

    quiet_bitsandbytes()  # before peft imports bitsandbytes
    warnings.filterwarnings("ignore", message="mtime may not be reliable")
    started = time.monotonic()
    prep = prepare(cfg, run, events, should_stop)
    trainer, callback = fit_with_retry(prep, run, events, should_stop)
    if callback.cancelled:
        latest = latest_checkpoint(run.checkpoints)
        summary: dict[str, Any] = {"step": trainer.state.global_step}
        if not should_stop():  # the stop came from another process (another node's launcher was cancelled)
            summary["reason"] = f"another process of the run was cancelled; all stopped at step {summary['step']}"
        return StepResult(status="cancelled", resume_from=str(latest) if latest else None, summary=summary)
    weights = _gathered_weights(prep, trainer)
    if prep.rank != 0:  # global rank 0 alone writes the adapter, its history and the run's files
        return StepResult(summary={"rank": prep.rank})
    return record_version(prep, run, events, trainer, started, weights)


def _gathered_weights(prep: Prepared, trainer: Any) -> dict[str, Any] | None:
    """Under DeepSpeed ZeRO-3 each process holds a part of the weights: every process takes part in gathering
    them (a collective), and rank 0 saves the adapter from the whole. None where rank 0 has them already."""
    t = prep.cfg.train
    if prep.world <= 1 or t.distributed != "deepspeed" or t.zero_stage != 3:
        return None
    state: dict[str, Any] = trainer.accelerator.get_state_dict(trainer.deepspeed)
    return state
