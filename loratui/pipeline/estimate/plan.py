"""``loratui estimate``: time, memory and disk of a run before it runs, and what to change when it does not fit.

:func:`estimate` reads the model's shape (its config.json), counts the data's tokens, resolves the ``auto``
settings as training will, then prices memory, disk and time; with ``probe`` the time per token and the
peak memory come from a few real optimizer steps (:mod:`loratui.pipeline.train.probe`). The train step calls
:func:`estimate_for` with what it has already resolved, so the panel it prints costs no extra work.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.estimate.data import DataFacts, data_facts, facts_from_folder
from loratui.pipeline.estimate.disk import estimate_disk
from loratui.pipeline.estimate.hardware import device_memory, disk_free
from loratui.pipeline.estimate.memory import TrainPlan, estimate_memory, largest_micro_tokens, max_micro_tokens
from loratui.pipeline.estimate.record import Budget, Estimate, Timing
from loratui.pipeline.estimate.shape import ModelShape
from loratui.pipeline.estimate.timing import (
    EVAL_FORWARD_SHARE,
    Rate,
    analytic_rate,
    computed_tokens,
    eval_seconds,
    gguf_seconds,
    matmul_flops,
    merge_seconds,
    onnx_seconds,
    optimizer_steps,
)
from loratui.pipeline.events import EventSink, null_sink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop
from loratui.pipeline.train import settings
from loratui.pipeline.train.topology import world_size

MEMORY_HEADROOM = 0.9  # auto batch sizing leaves this share of free memory for what the model does not see


def _never() -> bool:
    return False


def gpu_possible() -> bool:
    """Whether a GPU could be there, without importing torch: an NVIDIA, WSL or ROCm device node, or macOS."""
    nodes = ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")
    return sys.platform == "darwin" or any(Path(n).exists() for n in nodes)


def resolve_device(cfg: RunConfig) -> tuple[str, str, str]:
    """(device, why, precision) by the training's device table; torch is imported only where a GPU could be."""
    from loratui.pipeline import device as devices

    hw = (
        devices.probe()
        if cfg.train.device != "cpu" and gpu_possible()
        else devices.Probe(cpu_bf16=devices.cpu_has_native_bf16())
    )
    choice = devices.choose(cfg.train.device, hw)
    return choice.value, choice.reason, devices.precision(cfg.train.precision, choice.value, hw).value


def model_dir(cfg: RunConfig) -> Path:
    """The base model's local folder; a built-in is imported (once). A hub model not in the cache is not
    downloaded: its config and tokenizer files are, into a folder of the estimate's own (the weights come
    with the first training, and the Hugging Face cache never holds a partial snapshot)."""
    from loratui.pipeline.errors import ModelNotFound
    from loratui.pipeline.models import is_hub_id, resolve_model

    spec, revision = cfg.model.base, cfg.model.revision
    try:
        found = resolve_model(spec, revision=revision, prepare=False)
    except ModelNotFound:
        if not is_hub_id(spec):
            raise
        return hub_config(spec, revision)
    if not (found.path / "config.json").is_file():
        found = resolve_model(spec, revision=revision, prepare=True)
    return found.path


HUB_CONFIG_FILES = ["config.json", "tokenizer*", "*.model", "vocab.json", "merges.txt", "special_tokens_map.json"]


def hub_config(spec: str, revision: str | None) -> Path:
    """A hub model's config and tokenizer, without its weights (``$LORATUI_HOME/estimate-configs``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from loratui.pipeline.errors import ModelNotFound
    from loratui.pipeline.models import hub_offline, hub_reachable, loratui_home

    if hub_offline() or not hub_reachable():
        raise ModelNotFound(
            f"{spec}: not in the Hugging Face cache, and the hub is unreachable for its config.json",
            hint="Point model.base at a local folder with the model's config.json (weights not needed).",
        )
    try:
        folder = snapshot_download(
            spec, revision=revision, allow_patterns=HUB_CONFIG_FILES, cache_dir=loratui_home() / "estimate-configs"
        )
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{spec}: the hub refused its config ({e})", hint="Check the id, and HF_TOKEN.") from None
    return Path(folder)


@dataclass
class Inputs:
    """What an estimate prices: the model, the data, the device and the resolved settings."""

    cfg: RunConfig
    shape: ModelShape
    model_dir: Path
    facts: DataFacts
    device: str
    device_reason: str
    resolved: settings.Resolved
    padding_free: bool
    precision: str

    def plan(self) -> TrainPlan:
        cfg, r = self.cfg, self.resolved
        micro = r["train.batch_size"]
        tokens = largest_micro_tokens(self.facts.lengths, micro, self.padding_free)
        return TrainPlan(
            device=self.device,
            precision=self.precision,
            method=cfg.lora.method,
            r=r["lora.r"],
            target=cfg.lora.target_modules,
            micro_batch=micro,
            micro_tokens=tokens,
            trained_tokens=max(1, int(tokens * self.facts.trained_share)),
            padding_free=self.padding_free,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            optimizer=cfg.train.optimizer,
            double_quant=cfg.lora.double_quant,
            reference_forward=cfg.train.objective in ("dpo", "kto"),
        )


def token_budget(shape: ModelShape, plan: TrainPlan, available: int | None) -> int | None:
    """Tokens per micro-batch that fit in ``available`` bytes by the memory model (None: unknown)."""
    if available is None:
        return None
    return max_micro_tokens(shape, plan, int(available * MEMORY_HEADROOM))


def gather(
    cfg: RunConfig, events: EventSink, should_stop: ShouldStop, facts: DataFacts | None = None
) -> tuple[Inputs, int | None, str]:
    """Read the model and the data, resolve the device and the auto settings; also the free memory."""
    directory = model_dir(cfg)
    shape = ModelShape.read(directory)
    facts = facts or data_facts(cfg, directory, events, should_stop)
    if not facts.lengths:
        raise LoratuiError("the training data has no rows to estimate from", hint="Check data.source.")
    device, why, precision = resolve_device(cfg)
    available, where = device_memory(device)
    padding_free = cfg.train.padding_free and not shape.encoder_decoder
    inputs = _budgeted(cfg, shape, directory, facts, (device, why), precision, padding_free, available)
    return inputs, available, where


def _budgeted(
    cfg: RunConfig,
    shape: ModelShape,
    directory: Path,
    facts: DataFacts,
    device: tuple[str, str],
    precision: str,
    padding_free: bool,
    available: int | None,
) -> Inputs:
    """The inputs with the auto settings resolved twice: once to price a micro-batch, then with the
    tokens that fit in ``available`` by the memory model (what ``batch_size: auto`` follows)."""
    common: dict[str, Any] = dict(
        device=device[0], nproc=world_size(cfg.train), free_gib=_gib(available), params_b=shape.billions
    )
    first = settings.resolve_auto(cfg, facts.lengths, **common)
    inputs = Inputs(cfg, shape, directory, facts, device[0], device[1], first, padding_free, precision)
    budget = token_budget(shape, inputs.plan(), available)
    inputs.resolved = settings.resolve_auto(cfg, facts.lengths, **common, memory_tokens=budget)
    return inputs


def _gib(n: int | None) -> float | None:
    return None if n is None else n / (1 << 30)


def _train_seconds(inputs: Inputs, rate: Rate) -> tuple[float, float, int, float]:
    """(training seconds, per epoch, optimizer steps, epochs) at ``rate``."""
    cfg, r, facts = inputs.cfg, inputs.resolved, inputs.facts
    micro, accum, epochs = r["train.batch_size"], r["train.grad_accum"], float(r["train.epochs"])
    world = world_size(cfg.train)  # processes in all: nodes x nproc
    steps = optimizer_steps(facts.rows, micro, accum, world, epochs, cfg.train.max_steps)
    # the probe's rate is per example token with the padding of real batches in its time; the analytic one
    # is per token computed
    per_epoch_tokens = (
        facts.tokens
        if rate.source == "probe"
        else computed_tokens(facts.lengths, micro, inputs.padding_free, cfg.train.seed)
    )
    steps_per_epoch = optimizer_steps(facts.rows, micro, accum, world, 1, -1)
    if cfg.train.max_steps > 0:
        epochs = steps / steps_per_epoch
    per_epoch = per_epoch_tokens * rate.seconds_per_token / max(1, world)
    evals = math.ceil(steps / cfg.train.eval_every) if cfg.train.eval_every else math.ceil(epochs)
    validation = evals * facts.val_tokens * rate.seconds_per_token * EVAL_FORWARD_SHARE if facts.val_rows else 0.0
    return rate.setup_s + per_epoch * epochs + validation, per_epoch, steps, epochs


def _other_steps(inputs: Inputs, disk: dict[str, int], flops: float) -> dict[str, float]:
    cfg, shape, facts = inputs.cfg, inputs.shape, inputs.facts
    e = cfg.eval
    rows = min(facts.test_rows or facts.val_rows, e.max_samples or 10**9)
    out = {"eval": eval_seconds(shape, rows, 2 if e.compare_base else 1, e.batch_size, e.max_new_tokens, flops)}
    out["merge"] = merge_seconds(shape, disk["merged"])
    if "gguf" in cfg.export.formats:
        out["export gguf"] = gguf_seconds(shape, len(cfg.export.gguf_quants), shape.params * 2)
    if "gguf-lora" in cfg.export.formats:
        out["export gguf-lora"] = gguf_seconds(shape, 1, shape.params * 2)
    if "onnx" in cfg.export.formats:
        out["export onnx"] = onnx_seconds(shape, len(cfg.export.onnx_quants))
    return out


def _budgets(
    inputs: Inputs, plan: TrainPlan, available: int | None, where: str, steps: int, epochs: float
) -> tuple[Budget, Budget]:
    cfg, shape = inputs.cfg, inputs.shape
    memory = estimate_memory(shape, plan)
    trainable = shape.lora_params(plan.r, plan.target)
    data_tokens = inputs.facts.tokens + inputs.facts.val_tokens
    disk = estimate_disk(cfg, shape, inputs.model_dir, trainable, steps, epochs, data_tokens)
    runs = Path(cfg.runs_dir)
    return (
        Budget(parts=memory.parts, available=available, where=where),
        Budget(parts=disk, available=disk_free(runs), where=f"free on {runs}"),
    )


def price(
    inputs: Inputs, available: int | None, where: str, rate: Rate, flops: float, measured: dict[str, Any] | None = None
) -> Estimate:
    """The estimate of ``inputs`` at ``rate`` (training time) and ``flops`` (the other steps)."""
    plan = inputs.plan()
    train_s, per_epoch, steps, epochs = _train_seconds(inputs, rate)
    memory, disk = _budgets(inputs, plan, available, where, steps, epochs)
    if measured and measured.get("peak") is not None:
        memory = Budget(parts=_scaled(memory.parts, measured["peak"]), available=available, where=where)
    facts = inputs.facts
    parts = {"data": facts.seconds or 0.0, "train": train_s, **_other_steps(inputs, disk.parts, flops)}
    r = inputs.resolved
    result = Estimate(
        model=inputs.cfg.model.base,
        params=inputs.shape.params,
        device=inputs.device,
        device_reason=inputs.device_reason,
        settings={
            "batch_size": r["train.batch_size"],
            "grad_accum": r["train.grad_accum"],
            "epochs": r["train.epochs"],
            "lora_r": r["lora.r"],
            "micro_tokens": plan.micro_tokens,
            "padding_free": inputs.padding_free,
            "precision": plan.precision,
            "rows": facts.rows,
            "tokens_per_epoch": facts.tokens,
            "tokens_from": facts.source,
        },
        time=Timing(
            parts=parts,
            epochs=round(epochs, 3),
            steps=steps,
            per_epoch_s=per_epoch,
            tokens_per_s=1 / rate.seconds_per_token,
            source=rate.source,
            setup_s=rate.setup_s,
            confidence="training about ±25%, other steps within about a factor of 2"
            if rate.source == "probe"
            else "about a factor of 2 (no probe)",
        ),
        memory=memory,
        disk=disk,
        measured=measured or {},
    )
    result.notes += _notes(inputs, measured)
    if not result.fits:
        from loratui.pipeline.estimate.fit import what_fits

        result.changes = what_fits(inputs, plan, result, rate)
    return result


def _notes(inputs: Inputs, measured: dict[str, Any] | None) -> list[str]:
    """What the figures assume, where it matters."""
    t = inputs.cfg.train
    out: list[str] = []
    if measured:
        out.append(
            "the probe trained 2 steps on the longest examples (its peak is the run's largest micro-batch) and "
            f"timed {measured['steps_timed']} on a random sample; run it on an otherwise idle machine"
        )
    if t.mode != "fresh":
        out.append(f"train.mode {t.mode}: timed as a fresh adapter (merging earlier adapters first is not counted)")
    world = world_size(t)
    if world > 1:
        nodes = f" ({world // t.nproc} nodes x {t.nproc})" if world != t.nproc else ""
        out.append(f"{world} processes{nodes}: time divided by {world}, memory per process")
    return out


def _scaled(parts: dict[str, int], peak: int) -> dict[str, int]:
    """The modelled parts with the framework part set so that they add up to the measured ``peak``."""
    out = dict(parts)
    out["framework"] = max(0, peak - (sum(parts.values()) - parts["framework"]))
    return out


def estimate(
    cfg: RunConfig,
    *,
    probe: bool = True,
    events: EventSink | None = None,
    should_stop: ShouldStop = _never,
    facts: DataFacts | None = None,
) -> Estimate:
    """Time, memory and disk of training ``cfg`` and the steps after it; ``probe``: measure a few steps."""
    events = events or null_sink("estimate")
    inputs, available, where = gather(cfg, events, should_stop, facts)
    plan = inputs.plan()
    flops = matmul_flops(inputs.shape, plan.micro_tokens, inputs.device, plan.precision)
    trained_share = inputs.facts.trained_share
    rate = analytic_rate(inputs.shape, plan, flops, trained_share)
    measured: dict[str, Any] | None = None
    analytic_peak = estimate_memory(inputs.shape, plan).total
    skipped = None
    if probe and available is not None and analytic_peak > available:
        # a probe would page to disk or be killed: the memory model alone answers, with what would fit
        skipped = (
            f"no probe: the memory model puts the peak at {analytic_peak / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB {where}"
        )
    elif probe:
        from loratui.pipeline.train.probe import run_probe

        result = run_probe(cfg, events, should_stop)
        rate = Rate(result.seconds_per_token, "probe", result.setup_s)
        peak = result.gpu_peak if inputs.device == "cuda" and result.gpu_peak else result.peak_rss
        measured = {**result.__dict__, "peak": peak, "analytic_seconds_per_token": 1 / flops}
        # the run will find the data step's cache as the probe did: its preparation (data step, settings,
        # tokenizer) is what the run's will take
        inputs.facts.seconds = result.data_s
    found = price(inputs, available, where, rate, flops, measured)
    if skipped:
        found.notes.append(skipped)
    return found


# -- for the train step: the same models, on the settings it resolved ---------------------------------


def run_facts(run: RunDir, lengths: list[int]) -> DataFacts:
    """The token counts of a run whose data step just ran (``lengths``: its training examples')."""
    return facts_from_folder(run.data, "the run's prepared data", None, lengths)


def memory_tokens(
    cfg: RunConfig, model_dir: Path, facts: DataFacts, device: str, precision: str, padding_free: bool
) -> int | None:
    """Tokens per micro-batch that fit the device's free memory, for ``batch_size: auto`` (None: a model
    whose config the memory model cannot read; the rule of thumb then decides)."""
    try:
        shape = ModelShape.read(model_dir)
    except LoratuiError:
        return None
    available, _ = device_memory(device)
    first = settings.resolve_auto(cfg, facts.lengths, device=device, nproc=world_size(cfg.train))
    inputs = Inputs(cfg, shape, model_dir, facts, device, "", first, padding_free, precision)
    return token_budget(shape, inputs.plan(), available)


def estimate_for(
    cfg: RunConfig,
    model_dir: Path,
    facts: DataFacts,
    resolved: settings.Resolved,
    device: tuple[str, str],
    precision: str,
    padding_free: bool,
) -> Estimate:
    """The analytic estimate of the training the train step is about to start (``device``: value, why)."""
    shape = ModelShape.read(model_dir)
    available, where = device_memory(device[0])
    inputs = Inputs(cfg, shape, model_dir, facts, device[0], device[1], resolved, padding_free, precision)
    plan = inputs.plan()
    flops = matmul_flops(shape, plan.micro_tokens, device[0], precision, seconds=0.1)  # a panel, not a probe
    return price(inputs, available, where, analytic_rate(shape, plan, flops, facts.trained_share), flops)
