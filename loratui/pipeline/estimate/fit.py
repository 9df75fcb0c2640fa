"""What would make a run fit: each change a user can make in the config, priced by the same models.

Memory: QLoRA (where bitsandbytes runs), gradient checkpointing, a smaller micro-batch with more
accumulation (the effective batch stays), a shorter ``data.max_length``, an 8-bit optimizer (CUDA). Disk:
fewer checkpoints, no kept f16 GGUF. Each change alone first; when none is enough, the memory changes
together, in that order, as far as they go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratui.pipeline.estimate.disk import estimate_disk
from loratui.pipeline.estimate.memory import TrainPlan, estimate_memory, largest_micro_tokens
from loratui.pipeline.estimate.record import Change, Estimate
from loratui.pipeline.estimate.timing import Rate, train_flops_per_token

if TYPE_CHECKING:
    from loratui.pipeline.estimate.plan import Inputs


@dataclass(frozen=True)
class _Option:
    what: str
    overrides: list[str]
    plan: TrainPlan
    time_known: bool = True  # False: the change's speed is not modelled (QLoRA's dequantization)


def _clip(inputs: Inputs, plan: TrainPlan, max_length: int) -> TrainPlan:
    lengths = [min(n, max_length) for n in inputs.facts.lengths]
    tokens = largest_micro_tokens(lengths, plan.micro_batch, plan.padding_free)
    return plan.but(micro_tokens=tokens, trained_tokens=max(1, int(tokens * inputs.facts.trained_share)))


def _smaller_batch(inputs: Inputs, plan: TrainPlan, micro: int) -> _Option:
    tokens = largest_micro_tokens(inputs.facts.lengths, micro, plan.padding_free)
    effective = plan.micro_batch * inputs.resolved["train.grad_accum"]
    accum = max(1, -(-effective // micro))
    smaller = plan.but(
        micro_batch=micro, micro_tokens=tokens, trained_tokens=max(1, int(tokens * inputs.facts.trained_share))
    )
    return _Option(
        f"micro-batch {micro} x accumulation {accum} (same effective batch)",
        [f"train.batch_size={micro}", f"train.grad_accum={accum}"],
        smaller,
    )


def _memory_options(inputs: Inputs, plan: TrainPlan) -> list[_Option]:
    out: list[_Option] = []
    if plan.method != "qlora" and plan.device != "mps":
        out.append(_Option("QLoRA: the base in 4-bit NF4", ["lora.method=qlora"], plan.but(method="qlora"), False))
    if not plan.gradient_checkpointing:
        out.append(
            _Option(
                "gradient checkpointing",
                ["train.gradient_checkpointing=true"],
                plan.but(gradient_checkpointing=True),
            )
        )
    if plan.micro_batch > 1:
        out.append(_smaller_batch(inputs, plan, max(1, plan.micro_batch // 4)))
        out.append(_smaller_batch(inputs, plan, 1))
    longest = max(inputs.facts.lengths)
    for length in (longest // 2, longest // 4):
        if length >= 64:
            out.append(_Option(f"data.max_length {length}", [f"data.max_length={length}"], _clip(inputs, plan, length)))
    if plan.device == "cuda" and "8bit" not in plan.optimizer:
        out.append(_Option("8-bit AdamW", ["train.optimizer=adamw_bnb_8bit"], plan.but(optimizer="adamw_bnb_8bit")))
    return out


def _combined(options: list[_Option], start: TrainPlan, fits: Callable[[TrainPlan], bool]) -> _Option | None:
    """The memory changes applied one after another until the plan fits (None: not even all of them)."""
    plan, known = start, True
    whats: list[str] = []
    overrides: list[str] = []
    for option in options:
        changed = {k: v for k, v in option.plan.__dict__.items() if v != start.__dict__[k]}
        plan = plan.but(**changed)
        whats.append(option.what)
        overrides += [o for o in option.overrides if o.split("=")[0] not in {x.split("=")[0] for x in overrides}]
        known = known and option.time_known
        if fits(plan):
            return _Option(" + ".join(whats), overrides, plan, known)
    return None


def _price(inputs: Inputs, option: _Option, base: Estimate, rate: Rate) -> Change:
    memory = estimate_memory(inputs.shape, option.plan).total
    if base.measured.get("peak") is not None:  # keep the probe's correction of the model
        memory += base.memory.total - estimate_memory(inputs.shape, inputs.plan()).total
    share = inputs.facts.trained_share
    before = train_flops_per_token(inputs.shape, inputs.plan(), share)
    after = train_flops_per_token(inputs.shape, option.plan, share)
    train_s = base.time.parts["train"] * after / before if option.time_known else None
    available = base.memory.available
    return Change(
        what=option.what,
        overrides=option.overrides,
        memory=memory,
        disk=base.disk.total,
        train_s=train_s,
        fits=available is None or memory <= available,
    )


def _disk_changes(inputs: Inputs, base: Estimate) -> list[Change]:
    """Fewer checkpoints: the one disk change that keeps every artifact."""
    if inputs.cfg.train.save_total_limit <= 1:
        return []
    copy = inputs.cfg.model_copy(deep=True)
    copy.train.save_total_limit = 1
    plan = inputs.plan()
    trainable = inputs.shape.lora_params(plan.r, plan.target)
    data_tokens = inputs.facts.tokens + inputs.facts.val_tokens
    disk = sum(
        estimate_disk(
            copy, inputs.shape, inputs.model_dir, trainable, base.time.steps, base.time.epochs, data_tokens
        ).values()
    )
    free = base.disk.available
    return [
        Change(
            what="keep one checkpoint",
            overrides=["train.save_total_limit=1"],
            memory=base.memory.total,
            disk=disk,
            fits=free is None or disk <= free,
        )
    ]


def what_fits(inputs: Inputs, plan: TrainPlan, base: Estimate, rate: Rate) -> list[Change]:
    """The changes that make ``base`` fit, each with its new figures (memory first, then disk)."""
    changes: list[Change] = []
    if base.memory.fits is False:
        options = _memory_options(inputs, plan)
        priced = [_price(inputs, o, base, rate) for o in options]
        changes = [c for c in priced if c.fits]
        if not changes:
            available = base.memory.available or 0
            together = _combined(
                options, plan, lambda p: _price(inputs, _Option("", [], p), base, rate).memory <= available
            )
            changes = [_price(inputs, together, base, rate)] if together else sorted(priced, key=lambda c: c.memory)[:1]
    if base.disk.fits is False:
        changes += [c for c in _disk_changes(inputs, base) if c.fits]
    return changes
