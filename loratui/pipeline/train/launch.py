"""``train.nproc`` > 1: data-parallel training in N processes started by ``accelerate launch``.

The launcher (this process) runs the data step, then starts ``loratui train`` in N worker processes
(DDP; the gloo backend on CPU, NCCL on GPUs; FSDP with ``train.distributed: fsdp``). Rank 0 reports
its events as JSON lines on stdout; the launcher relays them, so events.jsonl, the terminal and the
TUI see one run. SIGTERM is passed on: the workers checkpoint and stop together.
"""

from __future__ import annotations

import os
import signal
import sys

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import FINAL_TYPES, EventSink
from loratui.pipeline.process import Supervised
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import WORKER_ENV, ShouldStop, StepResult


def launch_command(cfg: RunConfig, run: RunDir, cuda: bool) -> list[str]:
    n = cfg.train.nproc
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    if cfg.train.distributed == "fsdp":
        cmd += [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
        ]
    else:
        cmd += ["--multi_gpu"]  # accelerate's name for DDP through torch.distributed.run, CPUs included
    return cmd + ["-m", "loratui", "train", "--config", str(run.config), "--events", "jsonl"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_distributed(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    import torch

    from loratui.pipeline import device as devices
    from loratui.pipeline.data.prepare import prepare

    # refuse here what the device cannot run (nproc > 1 on MPS ...), not in every worker
    devices.training_rules(devices.pick(cfg.train.device), cfg.lora.method, cfg.train.optimizer, cfg.train.nproc)
    prepare(cfg, run, events, should_stop)
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < cfg.train.nproc:
        raise LoratuiError(
            f"train.nproc={cfg.train.nproc} but only {torch.cuda.device_count()} GPUs are visible",
            hint="Lower train.nproc, or set train.device=cpu for CPU processes.",
        )
    env = dict(os.environ, **{WORKER_ENV: "1"})
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.train.nproc)))
    cmd = launch_command(cfg, run, cuda)
    events.log(
        f"launching {cfg.train.nproc} processes ({cfg.train.distributed}, "
        f"{'NCCL' if cuda else 'gloo on CPU'}): {' '.join(cmd[2:])}"
    )
    # its own process group; the launcher goes when this process dies (killed: no chance to pass SIGTERM on)
    proc = Supervised(cmd, env=env, parent_death=signal.SIGTERM).start()
    proc.cancel_when(should_stop, grace_s=None)  # SIGTERM only: the launcher passes it on to every worker
    final = None
    for event in proc.events():
        if event.type in FINAL_TYPES:
            final = event
        else:
            events.emit(event)
    code = proc.wait()
    if final is not None and final.type == "done":
        return StepResult(summary={**final.summary, "processes": cfg.train.nproc})
    if final is not None and final.type == "cancelled":
        return StepResult(status="cancelled", resume_from=final.resume_from)
    if final is not None and final.type == "error":
        raise LoratuiError(final.message, hint=final.hint)
    tail = "\n".join(list(proc.stderr_tail)[-15:]).strip()
    raise LoratuiError(
        f"the {cfg.train.nproc} training processes exited with code {code} without a result", hint=tail[-1500:] or None
    )
