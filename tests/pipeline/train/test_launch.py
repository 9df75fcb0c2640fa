"""Several processes and several machines: the accelerate command, the wait for node 0's data, the printed
cluster launches, and two launchers on this machine as two CPU "nodes" over gloo (same losses as one process,
a cancel on node 1 that stops both, then --resume)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink, MemoryWriter, parse_event, read_events
from loratui.pipeline.runs import RunDir, write_config
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, load_step, run_step
from loratui.pipeline.train import launch
from loratui.pipeline.train.launch import NodesRecord, launch_command, wait_for_data
from loratui.pipeline.train.topology import Topology, resolve

CLUSTER_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def _cfg(tmp_path: Path, *overrides: str, name: str = "t", model: Path | str = "m") -> RunConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.base={model}",
            "data.source=quickstart",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# -- the accelerate command ------------------------------------------------------------------------


def test_one_node_keeps_a_free_local_port_and_ddp(tmp_path):
    cfg = _cfg(tmp_path, "train.nproc=2")
    cmd = launch_command(cfg, resolve(cfg.train, {}), "c.yaml")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert (_flag(cmd, "--num_processes"), _flag(cmd, "--num_machines")) == ("2", "1")
    assert "--machine_rank" not in cmd and "--main_process_ip" not in cmd
    assert int(_flag(cmd, "--main_process_port")) > 0 and "--multi_gpu" in cmd
    assert cmd[-7:] == ["-m", "loratui", "train", "--config", "c.yaml", "--events", "jsonl"]


def test_several_nodes_count_every_process_and_name_node_0():
    cfg = load_config(None, ["train.nproc=4"])
    topo = Topology(3, 2, 4, "gpu01", 29600, "SLURM")
    cmd = launch_command(cfg, topo, "/runs/x/nodes/node-2.yaml")
    assert _flag(cmd, "--num_processes") == "12"  # accelerate's meaning: all processes of all machines
    assert (_flag(cmd, "--num_machines"), _flag(cmd, "--machine_rank")) == ("3", "2")
    assert (_flag(cmd, "--main_process_ip"), _flag(cmd, "--main_process_port")) == ("gpu01", "29600")
    assert "--multi_gpu" in cmd


@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        (["train.distributed=fsdp"], ["--use_fsdp", "FULL_SHARD"], ["--multi_gpu", "--use_deepspeed"]),
        (
            ["train.distributed=deepspeed"],
            ["--use_deepspeed", "--zero_stage 2", "--deepspeed_multinode_launcher standard"],
            ["--multi_gpu", "--zero3_save_16bit_model"],
        ),
        (
            ["train.distributed=deepspeed", "train.zero_stage=3"],
            ["--zero_stage 3", "--zero3_save_16bit_model true", "--zero3_init_flag false"],
            ["--multi_gpu"],
        ),
    ],
)
def test_the_strategy_flags(overrides, present, absent):
    cfg = load_config(None, ["train.nproc=2", *overrides])
    line = " ".join(launch_command(cfg, Topology(2, 0, 2, "h", 29500, "config"), "c.yaml"))
    for flag in present:
        assert flag in line
    for flag in absent:
        assert flag not in line


def test_deepspeed_on_one_node_uses_no_multinode_launcher():
    cfg = load_config(None, ["train.nproc=2", "train.distributed=deepspeed"])
    assert "--deepspeed_multinode_launcher" not in launch_command(cfg, resolve(cfg.train, {}), "c.yaml")


def test_the_launcher_refuses_deepspeed_on_this_cpu_before_the_data_step(tmp_path, monkeypatch):
    from loratui.pipeline import device as devices

    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices, "probe", lambda: devices.Probe())
    monkeypatch.setattr(launch, "_data", lambda *a: pytest.fail("the data step ran"))
    cfg = _cfg(tmp_path, "train.nproc=2", "train.distributed=deepspeed")
    code, _, mem = _run_train(cfg)
    assert code == 2
    (error,) = mem.of_type("error")
    assert "DeepSpeed trains on CUDA GPUs only" in error.message and "train.distributed=ddp" in error.hint


def _run_train(cfg: RunConfig):
    mem = MemoryWriter()
    code, result, _ = run_step("train", load_step("train"), cfg, writers=[mem])
    return code, result, mem


# -- the wait for node 0's data step ---------------------------------------------------------------


def _wait(run: RunDir, key: str = "k", **kwargs):
    mem = MemoryWriter()
    return wait_for_data(run, key, EventSink("train", [mem]), kwargs.pop("stop", lambda: False), **kwargs), mem


def test_another_node_starts_once_node_0_prepared_this_launchs_data(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.data).mkdir(parents=True)
    (run.data / "dataset.json").write_text("{}")
    NodesRecord(key="k", state="ready", nodes=2, host="node0").save(run)
    ok, mem = _wait(run, timeout_s=5)
    assert ok and "node 0 (node0) prepared the data" in mem.of_type("log")[0].message


def test_the_wait_reports_progress_and_times_out_naming_the_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "WAIT_NOTE_S", 0.0)
    run = RunDir(tmp_path / "run")
    NodesRecord(key="another", state="ready", nodes=2, host="node0").save(run)  # an earlier launch's
    with pytest.raises(LoratuiError) as e:
        _wait(run, timeout_s=0.3, poll_s=0.05)
    assert "recorded another launch there" in e.value.message
    assert "filesystem every node shares" in (e.value.hint or "")
    mem = MemoryWriter()
    with pytest.raises(LoratuiError, match="node 0 has not written it there"):
        wait_for_data(RunDir(tmp_path / "nothing"), "k", EventSink("train", [mem]), lambda: False, 0.2, 0.05)
    assert mem.of_type("progress") and mem.of_type("progress")[0].task == "nodes"


def test_node_0_failing_or_cancelled_ends_the_wait(tmp_path):
    run = RunDir(tmp_path / "run")
    NodesRecord(key="k", state="failed", nodes=2, message="no such file: data.jsonl").save(run)
    with pytest.raises(LoratuiError, match="node 0's data step failed: no such file"):
        _wait(run, timeout_s=5)
    NodesRecord(key="k", state="cancelled", nodes=2).save(run)
    assert _wait(run, timeout_s=5)[0] is False


def test_a_cancel_while_waiting_returns_at_once(tmp_path):
    started = time.monotonic()
    ok, _ = _wait(RunDir(tmp_path / "run"), timeout_s=60, stop=lambda: True)
    assert ok is False and time.monotonic() - started < 5


def test_ready_data_missing_here_means_the_folder_is_not_shared(tmp_path):
    run = RunDir(tmp_path / "run")
    NodesRecord(key="k", state="ready", nodes=2, host="node0").save(run)
    with pytest.raises(LoratuiError, match="is not here") as e:
        _wait(run, timeout_s=5)
    assert "every node shares" in (e.value.hint or "")


def test_every_node_computes_the_same_launch_key_and_another_launch_differs(tmp_path):
    cfg = _cfg(tmp_path, "train.nodes=2", "train.main_address=h")
    one = launch.launch_key(cfg, Topology(2, 0, 1, "h", 29500, "config"), {})
    assert one == launch.launch_key(cfg, Topology(2, 1, 1, "other-name-of-h", 29500, "config"), {})
    assert one != launch.launch_key(cfg, Topology(2, 0, 1, "h", 29501, "config"), {})
    assert one != launch.launch_key(cfg, Topology(2, 0, 1, "h", 29500, "config"), {"SLURM_JOB_ID": "9"})
    other_data = _cfg(tmp_path, "train.nodes=2", "data.max_length=64")
    assert one != launch.launch_key(other_data, Topology(2, 0, 1, "h", 29500, "config"), {})


# -- the printed cluster launches ------------------------------------------------------------------


def _print(tmp_path: Path, kind: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``loratui train --print-launch KIND`` in a fresh interpreter, which must not import torch."""
    config = tmp_path / "run.yaml"
    write_config(config, _cfg(tmp_path, name="big"))
    code = (
        "import sys\nfrom loratui.cli import main\n"
        f"rc = main(['train', '--config', {str(config)!r}, '--print-launch', {kind!r}, *{list(args)!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _topology_of(line: str, env: dict[str, str]) -> tuple[RunConfig, Topology]:
    """What `loratui train` makes of a printed command line in ``env``."""
    from loratui.cli import _parse
    from loratui.cli.commands import _option_overrides

    for name, value in env.items():
        line = line.replace(f'"${name}"', value).replace(f"${name}", value)
    argv = shlex.split(line)
    _parser, args = _parse(argv[argv.index("loratui") + 1 :])
    cfg = load_config(args.config, [*args.overrides, *_option_overrides(args)])
    return cfg, resolve(cfg.train, env)


def test_print_launch_slurm_is_an_sbatch_script_whose_tasks_find_their_node(tmp_path):
    script = _print(tmp_path, "slurm", "--nproc", "4", "train.lr=1e-3")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4"):
        assert expected in lines
    assert "#SBATCH --signal=TERM@300" in lines and "filesystem every node shares" in script
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert '--nodes "$SLURM_NNODES"' in srun and "--print-launch" not in srun
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_PORT": "23456"}
    cfg, topo = _topology_of(srun, env)
    assert topo == Topology(2, 1, 4, "gpu07", 23456, "config")
    assert cfg.train.lr == 1e-3 and cfg.name == "big"


def test_print_launch_torchrun_gives_one_line_per_node(tmp_path):
    text = _print(tmp_path, "torchrun", "--nodes", "3", "--main-address", "10.1.1.1", "train.device=cpu")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        _cfg_line, topo = _topology_of(line, {})
        assert topo == Topology(3, rank, 1, "10.1.1.1", 29500, "config")
    accelerate = [line for line in text.splitlines() if "accelerate.commands.launch" in line]
    assert len(accelerate) == 3
    assert "--num_processes 3 --num_machines 3 --machine_rank 2 --main_process_ip 10.1.1.1" in accelerate[2]


def test_print_launch_without_an_address_leaves_master_addr_to_the_shell(tmp_path):
    text = _print(tmp_path, "torchrun")
    (node1,) = [line for line in text.splitlines() if "--node-rank 1" in line and not line.startswith("#")]
    assert '--main-address "$MASTER_ADDR"' in node1
    _cfg_line, topo = _topology_of(node1, {"MASTER_ADDR": "m.example"})
    assert topo.main_address == "m.example" and topo.node_rank == 1


# -- two CPU "nodes" on this machine ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(tmp_path: Path, config: Path, rank: int, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    """``loratui train`` as node ``rank`` of 2 (one process each), its stdout (JSON events) in a file."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / f"node{rank}-{time.monotonic_ns()}.jsonl"
    argv = [sys.executable, "-m", "loratui", "train", "--config", str(config), "--events", "jsonl"]
    argv += ["--nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1", "--main-port", str(port)]
    with out.open("w") as fh, (tmp_path / f"node{rank}.stderr").open("a") as err:
        return subprocess.Popen([*argv, *args], stdout=fh, stderr=err, env=env), out


def _events(path: Path) -> list:
    return [parse_event(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def _train_losses(events: list) -> dict[int, float]:
    return {e.at: e.values["loss"] for e in events if e.type == "metric" and e.split == "train" and "loss" in e.values}


def _stderr(tmp_path: Path) -> str:
    return "\n".join((tmp_path / f"node{r}.stderr").read_text()[-3000:] for r in (0, 1))


@pytest.mark.slow  # about a minute (three trainings): make test-slow, which CI runs
def test_two_nodes_train_as_one_process_with_the_same_effective_batch(tmp_path, tiny_llama):
    steps = 3
    common = (f"train.max_steps={steps}", "train.keep_best=false")
    nodes_cfg = _cfg(tmp_path, *common, "train.batch_size=2", "train.grad_accum=2", name="nodes", model=tiny_llama)
    config = tmp_path / "nodes.yaml"
    write_config(config, nodes_cfg)
    port = _free_port()
    node0, out0 = _node(tmp_path, config, 0, port)
    node1, out1 = _node(tmp_path, config, 1, port)
    # meanwhile, one process: 4 x 2 x 1 = 2 x 2 x 2 examples a step
    single = _cfg(tmp_path, *common, "train.batch_size=4", "train.grad_accum=2", name="single", model=tiny_llama)
    code, _, mem = _run_train(single)
    assert code == EXIT_OK
    assert node0.wait(timeout=300) == EXIT_OK, _stderr(tmp_path)
    assert node1.wait(timeout=60) == EXIT_OK, _stderr(tmp_path)

    run = RunDir.for_config(nodes_cfg)
    logged = read_events(run.events)
    two, one = _train_losses(logged), _train_losses(mem)
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    assert all(abs(two[s] - one[s]) < 1e-4 for s in one), (two, one)
    # one account of the run: node 1's launcher wrote no event of the training into events.jsonl
    assert [e.type for e in logged if e.type in ("done", "error", "cancelled")] == ["done"]
    assert len([e for e in logged if e.type == "metric" and e.split == "train"]) == steps
    (done,) = [e for e in logged if e.type == "done"]
    assert (done.summary["processes"], done.summary["nodes"], done.summary["node"]) == (2, 2, 0)
    follower = _events(out1)
    assert [e.type for e in follower if e.type in ("done", "error", "cancelled")] == ["done"]
    assert any("node 0" in e.message and "prepared the data" in e.message for e in follower if e.type == "log")
    assert not _train_losses(follower)  # the losses are rank 0's to report
    # the files of the run: one adapter version, config.yaml as global rank 0 wrote it back
    history = (run.path / "adapters" / "history.json").read_text()
    assert '"version": 1' in history and '"version": 2' not in history
    written = load_config(run.config)
    assert (written.train.batch_size, written.train.grad_accum, written.train.node_rank) == (2, 2, None)
    assert NodesRecord.load(run).state == "ready"
    assert (run.path / "nodes" / "node-1.yaml").is_file()


@pytest.mark.slow  # two launches of two nodes: about 90 s on two shared cores
def test_a_cancel_on_node_1_stops_both_nodes_and_resume_finishes(tmp_path, tiny_llama):
    cfg = _cfg(
        tmp_path,
        "train.max_steps=40",
        "train.batch_size=1",
        "train.grad_accum=1",
        "train.keep_best=false",
        name="cut",
        model=tiny_llama,
    )
    config = tmp_path / "cut.yaml"
    write_config(config, cfg)
    run = RunDir.for_config(cfg)
    port = _free_port()
    node0, out0 = _node(tmp_path, config, 0, port)
    node1, out1 = _node(tmp_path, config, 1, port)
    deadline = time.monotonic() + 240
    while not any(e.type == "progress" and e.task == "train" and e.current >= 2 for e in _safe_events(run.events)):
        assert node0.poll() is None and node1.poll() is None, _stderr(tmp_path)
        assert time.monotonic() < deadline, _stderr(tmp_path)
        time.sleep(0.1)
    node1.send_signal(signal.SIGTERM)  # the follower's launcher only
    assert node1.wait(timeout=120) == EXIT_CANCELLED, _stderr(tmp_path)
    assert node0.wait(timeout=120) == EXIT_CANCELLED, _stderr(tmp_path)
    logged = read_events(run.events)
    (cancelled,) = [e for e in logged if e.type == "cancelled"]
    assert cancelled.resume_from and "checkpoint-" in cancelled.resume_from
    assert "another node was cancelled" in cancelled.message  # node 0 was not signalled: it followed node 1
    stopped_at = int(cancelled.resume_from.rsplit("-", 1)[1])
    assert 2 <= stopped_at < 40
    checkpoint = Path(cancelled.resume_from)
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert [e.type for e in _events(out1) if e.type in ("done", "error", "cancelled")] == ["cancelled"]
    assert not [e for e in logged if e.type == "done"]

    port = _free_port()
    node0, _ = _node(tmp_path, config, 0, port, "--resume")
    node1, _ = _node(tmp_path, config, 1, port, "--resume")
    assert node0.wait(timeout=300) == EXIT_OK, _stderr(tmp_path)
    assert node1.wait(timeout=60) == EXIT_OK, _stderr(tmp_path)
    logged = read_events(run.events)
    assert any(e.type == "log" and e.message.startswith(f"resuming from {checkpoint}") for e in logged)
    (done,) = [e for e in logged if e.type == "done"]
    assert done.summary["steps"] == 40
    assert (run.adapter / "adapter_model.safetensors").is_file()


def _safe_events(path: Path) -> list:
    try:
        return read_events(path)
    except OSError:
        return []
