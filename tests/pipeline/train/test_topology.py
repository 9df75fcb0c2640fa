"""Where a run's processes are: config fields, then torchrun's and SLURM's variables, else one node."""

from __future__ import annotations

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.train import topology
from loratui.pipeline.train.topology import Topology, expand_hostlist, resolve, world_size


def _train(*overrides: str):
    return load_config(None, list(overrides)).train


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[08-11,14],login1", ["gpu08", "gpu09", "gpu10", "gpu11", "gpu14", "login1"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a-[7,9]-x,b[3]", ["a-7-x", "a-9-x", "b3"]),
        ("host.example.org,10.0.0.5", ["host.example.org", "10.0.0.5"]),
    ],
)
def test_slurm_host_lists_expand_like_scontrol(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-x]", "node[1-3", "node]1["])
def test_an_unreadable_host_list_is_a_user_error(bad):
    with pytest.raises(LoratuiError, match="SLURM host list"):
        expand_hostlist(bad)


def test_nothing_set_is_one_node_with_nproc_processes():
    topo = resolve(_train("train.nproc=3"), {})
    assert topo == Topology(1, 0, 3, None, None, "single node")
    assert topo.world == 3 and not topo.multi_node and topo.leader


def test_the_config_decides_before_the_environment():
    env = {"SLURM_NNODES": "8", "SLURM_NODEID": "5", "SLURM_JOB_NODELIST": "gpu[1-8]", "MASTER_PORT": "1234"}
    topo = resolve(
        _train("train.nodes=2", "train.node_rank=1", "train.main_address=10.0.0.1", "train.main_port=4000"), env
    )
    assert (topo.nodes, topo.node_rank, topo.main_address, topo.main_port) == (2, 1, "10.0.0.1", 4000)
    assert topo.world == 2 and topo.source == "config" and not topo.leader


def test_slurm_gives_nodes_rank_and_the_first_host_as_node_0():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "77"}
    topo = resolve(_train("train.nproc=4"), env)
    assert topo == Topology(3, 2, 4, "gpu07", 29500, "SLURM")
    assert topo.world == 12
    assert "node 2 of 3 (SLURM), 4 processes each, 12 in all; node 0 at gpu07:29500" == topo.describe()


def test_torchrun_variables_come_before_slurms():
    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "main.local",
        "MASTER_PORT": "29999",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "3",
        "SLURM_JOB_NODELIST": "gpu[1-4]",
    }
    assert resolve(_train(), env) == Topology(2, 1, 1, "main.local", 29999, "NNODES")


def test_a_config_node_count_takes_the_rank_from_the_environment():
    topo = resolve(_train("train.nodes=2"), {"SLURM_NODEID": "1", "SLURM_NODELIST": "n[1-2]"})
    assert (topo.nodes, topo.node_rank, topo.main_address) == (2, 1, "n1")


@pytest.mark.parametrize(
    ("overrides", "env", "message", "hint"),
    [
        (["train.nodes=2", "train.node_rank=2", "train.main_address=h"], {}, "rank is 2", "--node-rank"),
        (["train.node_rank=1"], {}, "the run has 1 node (ranks 0 to 0)", "below train.nodes"),
        (["train.nodes=2", "train.node_rank=1"], {}, "no address for node 0", "--main-address"),
        (["train.nodes=2"], {"MASTER_ADDR": "h"}, "nothing says which node this is", "srun"),
        ([], {"NNODES": "two"}, "NNODES='two'", None),
        ([], {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM host list", None),
        ([], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "not a TCP port", None),
    ],
)
def test_inconsistent_input_is_a_clear_user_error(overrides, env, message, hint):
    with pytest.raises(LoratuiError) as e:
        resolve(_train(*overrides), env)
    assert message in e.value.message
    if hint:
        assert hint in (e.value.hint or "")


def test_world_size_is_the_workers_world_inside_a_launch_and_nodes_x_nproc_outside():
    train = _train("train.nproc=2")
    assert world_size(train, {}) == 2
    assert world_size(train, {"NNODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "h"}) == 6
    assert world_size(train, {"LORATUI_WORKER": "1", "WORLD_SIZE": "8", "NNODES": "3"}) == 8
    assert world_size(train, {"NNODES": "3"}) == 2  # incomplete: refused when training starts, nproc meanwhile


def test_printing_assumes_two_nodes_when_nothing_says_more():
    assert topology.for_printing(_train("train.nproc=2"), {}) == Topology(2, 0, 2, None, 29500, "single node")
    slurm = {"SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "a[1-4]"}
    assert topology.for_printing(_train(), slurm) == Topology(4, 0, 1, "a1", 29500, "SLURM")


def test_the_estimate_counts_every_process_of_every_node(tmp_path, tiny_llama, monkeypatch):
    import math

    from loratui.pipeline.estimate.plan import estimate

    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "SLURM_NNODES", "SLURM_NODEID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def planned(*overrides: str):
        cfg = load_config(
            None,
            [f"runs_dir={tmp_path}", f"model.base={tiny_llama}", "data.source=quickstart", "train.epochs=2"]
            + ["train.device=cpu", *overrides],
        )
        return estimate(cfg, probe=False)

    one = planned()
    four = planned("train.nproc=2", "train.nodes=2", "train.node_rank=0", "train.main_address=h")
    micro, accum = four.settings["batch_size"], four.settings["grad_accum"]
    assert micro * accum * 4 == 16  # the effective batch spread over 2 nodes x 2 processes
    assert four.time.steps == 2 * math.ceil(math.ceil(100 / (micro * 4)) / accum)
    assert "4 processes (2 nodes x 2): time divided by 4" in "\n".join(four.lines())
    assert four.time.parts["train"] < one.time.parts["train"]
