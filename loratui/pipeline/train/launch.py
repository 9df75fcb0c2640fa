"""Training in several processes, on one machine or several (nodes), started by ``accelerate launch``.

With ``train.nproc`` > 1 or several nodes (:mod:`.topology`), the launcher (this process, one per node) starts
``loratui train`` in ``nproc`` worker processes on its node through ``accelerate launch``: DDP (the gloo backend
on CPU, NCCL on GPUs), FSDP, or DeepSpeed ZeRO-2/3 (``train.distributed``). ``--num_processes`` is the world
(``nodes x nproc``), as accelerate counts it.

- The data step runs once: on node 0, before its workers start. The other nodes wait until node 0 says, in
  ``<run>/nodes/ready.json``, that it prepared the data of this launch (progress events meanwhile, a timeout,
  cancellable). The run folder must be on a filesystem every node shares.
- Node 0's launcher relays global rank 0's events (JSON lines on its stdout) into the run's events.jsonl and
  its writers. Another node's launcher relays the first process of its node to its own terminal only and
  writes nothing into the run (the train step takes events.jsonl out of its sink).
- SIGTERM or Ctrl-C on any node's launcher goes to its workers; they tell the others at the next optimizer
  step (an all-reduce of the stop flag in :class:`~loratui.pipeline.train.callbacks.EventsCallback`), all
  save the checkpoint together and every node ends as cancelled; ``--resume`` goes on from it.
- :func:`print_launch`: ``loratui train --print-launch slurm|torchrun`` prints the commands for a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import FINAL_TYPES, EventSink
from loratui.pipeline.process import Supervised
from loratui.pipeline.runs import RunDir, atomic_write_text, write_config
from loratui.pipeline.steps import WORKER_ENV, ShouldStop, StepResult
from loratui.pipeline.train.topology import DEFAULT_PORT, SHARED_FOLDER, Topology, for_printing, resolve

DATA_WAIT_S = 3600.0  # how long another node waits for node 0's data step (LORATUI_DATA_WAIT_S overrides)
WAIT_NOTE_S = 5.0  # a progress event this often while waiting
# What the elastic agent gives its workers to stop after SIGTERM before SIGKILL: the checkpoint of a large
# model at the next optimizer step takes longer than torch's default 30 s.
SHUTDOWN_S = "600"


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


# -- the launch command ----------------------------------------------------------------------------


def strategy_args(cfg: RunConfig, multi_node: bool) -> list[str]:
    """accelerate's flags for ``train.distributed``."""
    t = cfg.train
    if t.distributed == "fsdp":
        return [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
        ]
    if t.distributed == "deepspeed":
        # the Trainer fills DeepSpeed's "auto" values (micro-batch, accumulation, clipping, precision)
        args = [
            "--use_deepspeed",
            "--zero_stage",
            str(t.zero_stage),
            "--offload_optimizer_device",
            "none",
            "--offload_param_device",
            "none",
            "--zero3_init_flag",
            "false",  # the base is loaded whole before the Trainer exists
        ]
        if t.zero_stage == 3:
            args += ["--zero3_save_16bit_model", "true"]  # the adapter is gathered from the partitions to save it
        if multi_node:
            args += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on every node, no pdsh/ssh
        return args
    return ["--multi_gpu"]  # accelerate's name for DDP through torch.distributed.run, CPUs included


def launch_command(cfg: RunConfig, topo: Topology, config: Path | str) -> list[str]:
    """``accelerate launch`` of this node's workers, each ``loratui train --config <config>``; node 0's port is
    the topology's (on a single node without ``train.main_port``: a free one)."""
    port = topo.main_port or (DEFAULT_PORT if topo.multi_node else _free_port())
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(topo.world),
        "--num_machines",
        str(topo.nodes),
    ]
    if topo.multi_node:
        cmd += ["--machine_rank", str(topo.node_rank), "--main_process_ip", str(topo.main_address)]
    cmd += ["--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += strategy_args(cfg, topo.multi_node)
    return cmd + ["-m", "loratui", "train", "--config", str(config), "--events", "jsonl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the data step, once for every node ------------------------------------------------------------


class NodesRecord(BaseModel):
    """``<run>/nodes/ready.json``: node 0's data step for one launch, as the other nodes wait for it."""

    model_config = ConfigDict(extra="allow")

    key: str  # the launch: the data step's inputs and the topology (see launch_key)
    state: Literal["data", "ready", "failed", "cancelled"]
    nodes: int
    host: str = Field(default_factory=socket.gethostname)
    message: str | None = None
    t: float = Field(default_factory=time.time)

    @staticmethod
    def file(run: RunDir) -> Path:
        return run.path / "nodes" / "ready.json"

    @classmethod
    def load(cls, run: RunDir) -> NodesRecord | None:
        try:
            return cls.model_validate_json(cls.file(run).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, run: RunDir) -> None:
        self.file(run).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.file(run), self.model_dump_json(indent=2) + "\n")


def launch_key(cfg: RunConfig, topo: Topology, env: dict[str, str] | None = None) -> str:
    """What every node of one launch computes alike before anything runs: the data step's fingerprint, the
    number of nodes and processes, the port, and the cluster's job id where there is one."""
    from loratui.pipeline import uptodate

    env = dict(os.environ) if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or ""
    payload = [uptodate.fingerprint(cfg, "data"), topo.nodes, topo.nproc, topo.main_port, job]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _prepare_on_node0(
    cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop, key: str, nodes: int
) -> None:
    """Node 0: the data step, with its outcome in ``nodes/ready.json`` for the other nodes."""
    from loratui.pipeline.data.prepare import prepare

    NodesRecord(key=key, state="data", nodes=nodes).save(run)  # a record of an earlier launch goes
    try:
        prepare(cfg, run, events, should_stop)
    except StepCancelled:
        NodesRecord(key=key, state="cancelled", nodes=nodes, message="cancelled on node 0").save(run)
        raise
    except LoratuiError as e:
        NodesRecord(key=key, state="failed", nodes=nodes, message=e.message).save(run)
        raise
    except Exception as e:
        NodesRecord(key=key, state="failed", nodes=nodes, message=f"{type(e).__name__}: {e}").save(run)
        raise
    state: Literal["ready", "cancelled"] = "cancelled" if should_stop() else "ready"
    NodesRecord(key=key, state=state, nodes=nodes).save(run)


def wait_for_data(
    run: RunDir,
    key: str,
    events: EventSink,
    should_stop: ShouldStop,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> bool:
    """Another node: wait until node 0 prepared this launch's data; False when cancelled meanwhile.

    Raises LoratuiError when node 0's data step failed, or after ``timeout_s`` (``LORATUI_DATA_WAIT_S``,
    else an hour) without a word from it: most often a run folder the nodes do not share."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("LORATUI_DATA_WAIT_S") or DATA_WAIT_S)
    started = time.monotonic()
    noted = -WAIT_NOTE_S
    seen: NodesRecord | None = None
    while True:
        record = NodesRecord.load(run)
        if record is not None and record.key == key:
            if record.state == "ready":
                if not (run.data / DatasetManifest.FILE).is_file():
                    raise LoratuiError(
                        f"node 0 ({record.host}) prepared the data, but {run.data} is not here",
                        hint=f"{SHARED_FOLDER}: runs_dir must name the same folder on every node.",
                    )
                events.log(f"node 0 ({record.host}) prepared the data; starting this node's processes")
                return True
            if record.state == "cancelled":
                return False
            if record.state == "failed":
                raise LoratuiError(f"node 0's data step failed: {record.message}", hint="See node 0's output.")
        seen = record or seen
        if should_stop():
            return False
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s:
            raise LoratuiError(
                f"waited {elapsed:.0f} s for node 0's data step in {run.path}; "
                + (
                    "node 0 has not written it there"
                    if seen is None
                    else f"node 0 ({seen.host}) recorded another launch there (other data, nodes or port)"
                ),
                hint=f"Start node 0 too (train.node_rank=0), with the same config. {SHARED_FOLDER}. "
                "LORATUI_DATA_WAIT_S sets how long to wait.",
            )
        if elapsed - noted >= WAIT_NOTE_S:
            noted = elapsed
            events.progress(
                round(elapsed), round(timeout_s), task="nodes", unit="s", message="waiting for node 0's data step"
            )
        time.sleep(poll_s)


def worker_config(cfg: RunConfig, run: RunDir, topo: Topology) -> Path:
    """The config this node's workers read. One node: the run's config.yaml. Several: ``nodes/node-<rank>.yaml``,
    this node's own copy (without the rank, which is the launcher's), so that no node reads a config.yaml
    that another node's launcher is writing."""
    if not topo.multi_node:
        return run.config
    copy = cfg.model_copy(deep=True)
    copy.train.node_rank = None
    path = run.path / "nodes" / f"node-{topo.node_rank}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config(path, copy)
    return path


# -- the launcher ----------------------------------------------------------------------------------


def _worker_env(cfg: RunConfig, cuda: bool) -> dict[str, str]:
    env = dict(os.environ, **{WORKER_ENV: "1"})
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_S)
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.train.nproc)))
    return env


def _platform(cfg: RunConfig, topo: Topology) -> bool:
    """Refuse what this machine cannot run (several processes on MPS, DeepSpeed without CUDA, too few GPUs)
    before the data step; whether the workers train on CUDA."""
    import torch

    from loratui.pipeline import device as devices

    devices.training_rules(
        devices.pick(cfg.train.device), cfg.lora.method, cfg.train.optimizer, topo.world, cfg.train.distributed
    )
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < topo.nproc:
        raise LoratuiError(
            f"train.nproc={topo.nproc} but only {torch.cuda.device_count()} GPUs are visible"
            + (f" on node {topo.node_rank}" if topo.multi_node else ""),
            hint="Lower train.nproc (processes per node), or set train.device=cpu for CPU processes.",
        )
    return cuda


def _data(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop, topo: Topology) -> bool:
    """The data step here (one node, or node 0), or the wait for node 0's; False when cancelled meanwhile."""
    if not topo.multi_node:
        from loratui.pipeline.data.prepare import prepare

        prepare(cfg, run, events, should_stop)
        return not should_stop()
    events.log(f"multi-node training: {topo.describe()}")
    key = launch_key(cfg, topo)
    if topo.leader:
        _prepare_on_node0(cfg, run, events, should_stop, key, topo.nodes)
        return not should_stop()
    return wait_for_data(run, key, events, should_stop) and not should_stop()


def run_distributed(
    cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop, topo: Topology | None = None
) -> StepResult:
    """This node's part of a multi-process run: the data step (node 0) or the wait for it, then the workers."""
    topo = topo or resolve(cfg.train)
    cuda = _platform(cfg, topo)
    if not _data(cfg, run, events, should_stop, topo):
        return StepResult(status="cancelled", summary={"reason": "cancelled before training started"})
    cmd = launch_command(cfg, topo, worker_config(cfg, run, topo))
    where = f" on node {topo.node_rank} of {topo.nodes}, {topo.world} in all" if topo.multi_node else ""
    events.log(
        f"launching {_processes(topo.nproc)}{where} ({cfg.train.distributed}, "
        f"{'NCCL' if cuda else 'gloo on CPU'}): {' '.join(cmd[2:])}"
    )
    # its own process group; the launcher goes when this process dies (killed: no chance to pass SIGTERM on)
    proc = Supervised(cmd, env=_worker_env(cfg, cuda), parent_death=signal.SIGTERM).start()
    proc.cancel_when(should_stop, grace_s=None)  # SIGTERM only: the workers checkpoint, then stop
    final = None
    for event in proc.events():
        if event.type in FINAL_TYPES:
            final = event
        else:
            events.emit(event)
    code = proc.wait()
    processes = {"processes": topo.world, **({"nodes": topo.nodes, "node": topo.node_rank} if topo.multi_node else {})}
    if final is not None and final.type == "done":
        return StepResult(summary={**final.summary, **processes})
    if final is not None and final.type == "cancelled":
        cause = "another node was cancelled" if topo.multi_node else "a training process was cancelled"
        reason = {} if should_stop() else {"reason": f"{cause}; every process stopped at the same step"}
        return StepResult(status="cancelled", resume_from=final.resume_from, summary=reason)
    if final is not None and final.type == "error":
        raise LoratuiError(final.message, hint=final.hint)
    tail = "\n".join(list(proc.stderr_tail)[-15:]).strip()
    raise LoratuiError(
        f"the {_processes(topo.nproc)}{where} exited with code {code} without a result", hint=tail[-1500:] or None
    )


# -- loratui train --print-launch ------------------------------------------------------------------

TOPOLOGY_KEYS = ("train.nodes", "train.node_rank", "train.main_address", "train.main_port")


def _train_argv(config: str | None, overrides: list[str], cfg: RunConfig) -> list[str]:
    """``python -m loratui train --config ... KEY=VALUE ...`` with the overrides that are not the topology."""
    argv = [sys.executable, "-m", "loratui", "train"]
    if config:
        argv += ["--config", str(Path(config).resolve())]
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in (*TOPOLOGY_KEYS, "train.nproc")]
    return [*argv, *kept, "--nproc", str(cfg.train.nproc)]


def slurm_script(cfg: RunConfig, config: str | None, overrides: list[str]) -> str:
    """An sbatch script: one task per node, each ``loratui train`` with SLURM's node count and rank."""
    topo = for_printing(cfg.train)
    train = shlex.join(_train_argv(config, overrides, cfg))
    gpus = cfg.train.device != "cpu"
    lines = [
        "#!/bin/bash",
        f"# loratui train on {topo.nodes} nodes x {_processes(topo.nproc)}; written by `loratui train --print-launch "
        "slurm`.",
        f"# Submit with `sbatch <this file>`. {SHARED_FOLDER}: {cfg.run_dir.resolve()}.",
        f"#SBATCH --job-name=loratui-{cfg.name}",
        f"#SBATCH --nodes={topo.nodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={topo.nproc}"] if gpus else []),
        f"#SBATCH --chdir={Path.cwd()}",
        "# SIGTERM 5 minutes before the time limit: every node checkpoints at the next step (resume with --resume)",
        "#SBATCH --signal=TERM@300",
        "set -euo pipefail",
        "# node 0 is the allocation's first host (loratui reads SLURM_JOB_NODELIST), each task's rank SLURM_NODEID;",
        "# a port of the job's own, so that two jobs on one host do not collide",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f'srun --ntasks-per-node=1 {train} --nodes "$SLURM_NNODES"',
        "",
    ]
    return "\n".join(lines)


def torchrun_lines(cfg: RunConfig, config: str | None, overrides: list[str]) -> str:
    """One ``loratui train`` line per node, with the ``accelerate launch`` each one starts."""
    topo = for_printing(cfg.train)
    address = topo.main_address or "$MASTER_ADDR"
    train = _train_argv(config, overrides, cfg)
    out = [
        f"# loratui train on {topo.nodes} nodes x {_processes(topo.nproc)} ({topo.world} in all), "
        "written by `loratui train --print-launch torchrun`.",
        f"# Run one line on each machine, in {Path.cwd()}. {SHARED_FOLDER}: {cfg.run_dir.resolve()}.",
        "# The same variables as torchrun work instead of the flags: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.",
    ]
    for rank in range(topo.nodes):
        node = Topology(topo.nodes, rank, topo.nproc, address, topo.main_port, "print")
        flags = ["--nodes", str(node.nodes), "--node-rank", str(rank), "--main-address", address]
        flags += ["--main-port", str(node.main_port)]
        line = shlex.join([*train, *flags]).replace(shlex.quote("$MASTER_ADDR"), '"$MASTER_ADDR"')
        worker = cfg.run_dir / "nodes" / f"node-{rank}.yaml"
        accelerate = shlex.join(launch_command(cfg, node, worker)[1:]).replace(
            shlex.quote("$MASTER_ADDR"), '"$MASTER_ADDR"'
        )
        out += ["", f"# node {rank}" + (f" (listens on {address}:{node.main_port})" if rank == 0 else ""), line]
        out += [f"#   after the data step it starts: python {accelerate}"]
    return "\n".join(out) + "\n"


def print_launch(cfg: RunConfig, kind: str, config: str | None = None, overrides: list[str] | None = None) -> int:
    """``loratui train --print-launch slurm|torchrun``: print the launch for a cluster; trains nothing."""
    overrides = list(overrides or [])
    text = slurm_script(cfg, config, overrides) if kind == "slurm" else torchrun_lines(cfg, config, overrides)
    sys.stdout.write(text)
    return 0
