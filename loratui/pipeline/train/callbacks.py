"""Trainer callbacks: events (progress, metrics, checkpoints), cancel at a step boundary.

In a run of several processes (one machine or several), SIGTERM may reach one process only (the launcher of
one node was cancelled) or the processes at different steps: at the end of every optimizer step they agree on
stopping (an all-reduce of the stop flag), so that all stop at the same step and save its checkpoint together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loratui.pipeline.events import EventSink

RENAME = {"learning_rate": "lr", "eval_loss": "eval_loss"}
# what the preference objectives log beside the loss (train/preference.py); eval_ in front on validation
PREFERENCE_FIGURES = (
    "reward_accuracy",
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "nll_loss",
    "log_odds_ratio",
    "kl",
)
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "epoch", *PREFERENCE_FIGURES)
EVAL_KEYS = ("eval_loss", "epoch", *(f"eval_{name}" for name in PREFERENCE_FIGURES))


class EventsCallback(TrainerCallback):
    """Turns the Trainer's life into loratui events; SIGTERM (``should_stop``) ends training after
    the current optimizer step with a checkpoint saved."""

    def __init__(
        self, events: EventSink, should_stop: Callable[[], bool], tokens: Callable[[], int], world_size: int = 1
    ):
        self.events = events
        self.should_stop = should_stop
        self.tokens = tokens
        self.world_size = world_size
        self.cancelled = False
        self.checkpoints: list[str] = []
        self.history: list[dict[str, Any]] = []  # every logged metric row, for the summary
        self._start_time = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start_time = self._last_time = time.monotonic()
        self._start_step = state.global_step
        self._last_tokens = self.tokens()
        if state.is_world_process_zero:
            self.events.progress(state.global_step, state.max_steps, task="train", unit="steps")

    def stop_agreed(self, args: Any) -> bool:
        """``should_stop()`` here or in any other process of the run (every process calls this at the same
        optimizer step; with one process it is the local flag)."""
        stop = self.should_stop()
        if self.world_size <= 1:
            return stop
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return stop
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=args.device)  # NCCL: on the GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.cancelled and self.stop_agreed(args):
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True
        if state.is_world_process_zero:
            elapsed = time.monotonic() - self._start_time
            done = state.global_step - self._start_step
            eta = elapsed / done * (state.max_steps - state.global_step) if done else None
            last = next((h for h in reversed(self.history) if "loss" in h), None)
            note = f"loss {last['loss']:.4f}  {last['tokens_per_s']:.0f} tok/s" if last else None
            self.events.progress(
                state.global_step,
                state.max_steps,
                task="train",
                unit="steps",
                message=note,
                eta_s=None if eta is None else round(eta, 1),
                epoch=round(state.epoch or 0, 3),
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        now = time.monotonic()
        if "loss" in logs:
            tokens = self.tokens()
            seconds = max(now - self._last_time, 1e-9)
            values = {RENAME.get(k, k): float(v) for k, v in logs.items() if k in TRAIN_KEYS and v is not None}
            values["tokens_per_s"] = round((tokens - self._last_tokens) * self.world_size / seconds, 1)
            values["tokens"] = float(tokens * self.world_size)
            self._last_time, self._last_tokens = now, tokens
            self.history.append({"step": state.global_step, **values})
            self.events.metric(values, at=state.global_step, split="train")
        if "eval_loss" in logs:
            values = {k: float(v) for k, v in logs.items() if k in EVAL_KEYS and v is not None}
            self.history.append({"step": state.global_step, **values})
            self.events.metric(values, at=state.global_step, split="validation")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.checkpoints.append(str(path))
            self.events.checkpoint(path, at=state.global_step)
