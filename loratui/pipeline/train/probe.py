"""The estimate's probe: a few real optimizer steps of a run's training, on a copy in a temporary folder.

:func:`run_probe` starts ``python -m loratui.pipeline.train.probe CONFIG STEPS`` under the process
supervisor (its own process, so its peak resident memory is the training's alone) and reads its events.
The child prepares the data and the settings exactly as ``loratui train`` does, then trains, in this order
(not shuffled): :data:`MEMORY_STEPS` steps on the *longest* examples, so its peak memory is the run's
largest micro-batch (and the first step's allocation and first-call work are out of the way), then
:data:`TIMED_STEPS` steps on a seeded random sample of the others, timed: the run's own kind of batches,
so the time per token includes what small or padded micro-batches cost. Nothing is written into the run:
the copy's ``runs_dir`` is the temporary folder, training is ``fresh``, single-process, without
validation or reporting.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink, JsonlWriter, Metric, Progress, Writer
from loratui.pipeline.runs import RunDir, write_config
from loratui.pipeline.steps import ShouldStop

MEMORY_STEPS = 2  # on the longest examples: the peak memory (and the first step's warm-up)
TIMED_STEPS = 3  # on a random sample: the time per token
PROBE_STEPS = MEMORY_STEPS + TIMED_STEPS


@dataclass(frozen=True)
class ProbeResult:
    seconds_per_token: float  # per example token (padding included in the time), over the timed steps
    setup_s: float  # data step done -> first optimizer step begins (model load, adapter, Trainer)
    data_s: float  # the data step (and settings) in the copy
    peak_rss: int  # bytes, the child's maximum resident set
    gpu_peak: int | None  # torch.cuda.max_memory_allocated, bytes
    trainable: int
    micro_batch: int
    grad_accum: int
    checkpoint_bytes: int  # the checkpoint the Trainer saved at the probe's last step
    steps_timed: int


def probe_config(cfg: RunConfig, folder: Path, steps: int) -> RunConfig:
    """The copy of ``cfg`` the probe trains: in ``folder``, ``steps`` steps, nothing kept or reported."""
    copy = cfg.model_copy(deep=True)
    copy.runs_dir, copy.name = str(folder), "probe"
    t = copy.train
    t.mode, t.resume, t.nproc, t.max_steps = "fresh", False, 1, steps
    t.logging_every, t.report_to, t.keep_best, t.early_stopping_patience = 1, [], False, None
    t.save_every, t.save_total_limit, t.oom_fallback = steps, 1, False
    copy.lora.init_from = None
    return copy


def run_probe(cfg: RunConfig, events: EventSink, should_stop: ShouldStop, steps: int = PROBE_STEPS) -> ProbeResult:
    """Train ``steps`` steps of ``cfg`` in a child process on a temporary copy; what it measured."""
    from loratui.pipeline.process import Supervised

    with tempfile.TemporaryDirectory(prefix="loratui-probe-") as tmp:
        copy = probe_config(cfg, Path(tmp), steps)
        path = Path(tmp) / "probe.yaml"
        write_config(path, copy)
        argv = [sys.executable, "-m", "loratui.pipeline.train.probe", str(path), str(steps)]
        proc = Supervised(argv).start()
        proc.cancel_when(should_stop, grace_s=5.0)
        result = None
        for event in proc.events(log_step="probe"):
            if event.type == "progress" and event.task == "train":
                events.progress(event.current, event.total, task="probe", unit="steps", message="measuring")
            elif event.type == "done":
                result = event.summary
            elif event.type == "error":
                raise LoratuiError(f"the estimate's probe failed: {event.message}", hint=event.hint)
        code = proc.wait()
        if should_stop():
            raise LoratuiError("the estimate's probe was cancelled")
        if result is None:
            tail = "\n".join(list(proc.stderr_tail)[-10:])
            raise LoratuiError(f"the estimate's probe exited with code {code} without a result", hint=tail or None)
        return ProbeResult(**result)


# -- the child ------------------------------------------------------------------------------------


class _Clock:
    """Keeps when each training step ended and how many tokens had been trained by then."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}
        self.tokens: dict[int, float] = {}
        self.first: float | None = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, Progress) and event.task == "train":
            if event.current == 0 and self.first is None:
                self.first = event.t
            self.ends[int(event.current)] = event.t
        elif isinstance(event, Metric) and event.split == "train" and event.at is not None:
            self.tokens[event.at] = event.values.get("tokens", 0.0)


def _probe_order(prep: Any, seed: int) -> None:
    """The examples the probe trains on, in order: the longest first, then a random sample of the rest."""
    import random

    resolved = prep.resolved
    per_step = resolved["train.batch_size"] * resolved["train.grad_accum"]
    from loratui.pipeline.train.objectives import row_lengths

    lengths = row_lengths(prep.inputs.train_ds)  # a pair: both sequences go through the model
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest, rest = by_length[: MEMORY_STEPS * per_step], by_length[MEMORY_STEPS * per_step :] or by_length
    rng = random.Random(seed)
    need = TIMED_STEPS * per_step
    sample = rng.sample(rest, need) if len(rest) >= need else rng.choices(rest, k=need)
    prep.inputs.train_ds = prep.inputs.train_ds.select(longest + sample)
    prep.inputs.val_ds = None
    prep.inputs.in_order = True


def _timed(clock: _Clock, steps: int) -> tuple[float, int]:
    """(seconds per token, steps timed) over the steps after the memory steps."""
    first = MEMORY_STEPS + 1
    timed = [s for s in range(first, steps + 1) if s in clock.ends and s - 1 in clock.ends and s in clock.tokens]
    seconds = sum(clock.ends[s] - clock.ends[s - 1] for s in timed)
    tokens = sum(clock.tokens[s] - clock.tokens.get(s - 1, 0.0) for s in timed)
    if not timed or tokens <= 0:
        raise LoratuiError("the probe trained too few steps to time (the training data has too few rows)")
    return seconds / tokens, len(timed)


def _probe(config: Path, steps: int, out: Writer) -> dict[str, Any]:
    from loratui.pipeline.config import load_config
    from loratui.pipeline.train.step import fit_with_retry, prepare

    cfg = load_config(config)
    clock = _Clock()
    events = EventSink("probe", [out, clock])
    run = RunDir.for_config(cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    start = time.time()
    prep = prepare(cfg, run, EventSink("probe", [clock]), lambda: False)
    data_s = time.time() - start
    _probe_order(prep, cfg.train.seed)
    trainer, _callback = fit_with_retry(prep, run, events, lambda: False)
    per_token, timed = _timed(clock, steps)
    checkpoints = list(run.checkpoints.glob("checkpoint-*"))
    return {
        "seconds_per_token": per_token,
        "setup_s": (clock.first or time.time()) - start - data_s,
        "data_s": data_s,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_peak": _gpu_peak(),
        "trainable": int(trainer.model.get_nb_trainable_parameters()[0]),
        "micro_batch": prep.resolved["train.batch_size"],
        "grad_accum": prep.resolved["train.grad_accum"],
        "checkpoint_bytes": sum(f.stat().st_size for c in checkpoints for f in c.iterdir() if f.is_file()),
        "steps_timed": timed,
    }


def _gpu_peak() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def main(argv: list[str]) -> int:
    out = JsonlWriter(sys.stdout)
    sink = EventSink("probe", [out])
    try:
        summary = _probe(Path(argv[0]), int(argv[1]), out)
    except LoratuiError as e:
        sink.error(e.message, e.hint)
        return 2
    sink.done(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
