"""Where a training run's processes are: how many machines (nodes), which one this is, and where node 0 listens.

Pure functions of the config's ``train`` section and the environment (no torch), so the launcher, the
estimate and ``loratui train --print-launch`` agree, and tests need no cluster. Each field comes from the
config when it is set, else from the environment a cluster sets, else from the single-node default:

=============  ====================  =================================  ==================================
field          config                torchrun-style environment         SLURM (``srun``, one task a node)
=============  ====================  =================================  ==================================
nodes          ``train.nodes``       ``NNODES``                         ``SLURM_NNODES``
node rank      ``train.node_rank``   ``NODE_RANK``                      ``SLURM_NODEID``
main address   ``train.main_address``  ``MASTER_ADDR``                  first host of ``SLURM_JOB_NODELIST``
main port      ``train.main_port``   ``MASTER_PORT``                    29500
=============  ====================  =================================  ==================================

The torchrun-style variables are read before SLURM's (a job script that exports ``MASTER_ADDR`` means it).
``nproc`` is always ``train.nproc``: processes per node; the world is ``nodes x nproc``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from loratui.pipeline.config import TrainSection
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.steps import WORKER_ENV

DEFAULT_PORT = 29500
SHARED_FOLDER = "The run folder must be on a filesystem every node shares (NFS, Lustre, GPFS ...)"


@dataclass(frozen=True)
class Topology:
    """The machines of one training run, as this node sees them."""

    nodes: int = 1
    node_rank: int = 0
    nproc: int = 1
    main_address: str | None = None  # node 0's address; None on a single node (the launcher picks 127.0.0.1)
    main_port: int | None = None  # None on a single node without train.main_port: a free port
    source: str = "single node"  # where nodes and the rank came from: config, torchrun env, SLURM

    @property
    def world(self) -> int:
        """Processes in all: ``nodes x nproc`` (accelerate's ``--num_processes``)."""
        return self.nodes * self.nproc

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def leader(self) -> bool:
        """Node 0: runs the data step, hosts the rendezvous, writes the run's events and files."""
        return self.node_rank == 0

    def describe(self) -> str:
        if not self.multi_node:
            return f"{self.nproc} process{'es' if self.nproc > 1 else ''} on this machine"
        return (
            f"node {self.node_rank} of {self.nodes} ({self.source}), {self.nproc} process"
            f"{'es' if self.nproc > 1 else ''} each, {self.world} in all; node 0 at {self.main_address}:{self.main_port}"
        )


# -- SLURM host lists ------------------------------------------------------------------------------


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list as host names: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1.

    Ranges keep the width of their first number (``[08-10]`` -> 08 09 10); several bracket groups in one
    name multiply (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), as ``scontrol show hostnames`` prints them.
    """
    hosts: list[str] = []
    for item in _top_level_split(text.strip()):
        if not item:
            continue
        parts = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("[") and part.endswith("]"):
                choices.append(_expand_ranges(part[1:-1], text))
            elif "[" in part or "]" in part:
                raise LoratuiError(f"cannot read the SLURM host list {text!r} (unbalanced brackets)")
            else:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _top_level_split(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return items


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for piece in spec.split(","):
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LoratuiError(f"cannot read the SLURM host list {whole!r} (range {piece!r})")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


# -- resolution ------------------------------------------------------------------------------------


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise LoratuiError(f"the environment sets {name}={value!r}, which is not a whole number") from None


def _first_node(env: Mapping[str, str]) -> str | None:
    listed = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not listed:
        return None
    hosts = expand_hostlist(listed)
    return hosts[0] if hosts else None


def _nodes_and_rank(train: TrainSection, env: Mapping[str, str]) -> tuple[int, int | None, str]:
    """(nodes, this node's rank or None when nothing says, where they came from)."""
    if train.nodes is not None:
        nodes, source = train.nodes, "config"
    elif (n := _env_int(env, "NNODES")) is not None:
        nodes, source = n, "NNODES"
    elif (n := _env_int(env, "SLURM_NNODES")) is not None:
        nodes, source = n, "SLURM"
    else:
        nodes, source = 1, "single node"
    if train.node_rank is not None:
        rank: int | None = train.node_rank
    elif (r := _env_int(env, "NODE_RANK")) is not None:
        rank = r
    else:
        rank = _env_int(env, "SLURM_NODEID")
    return nodes, rank, source


def resolve(train: TrainSection, env: Mapping[str, str] | None = None) -> Topology:
    """This node's view of the run: config fields first, then torchrun's variables, then SLURM's, else one node.

    Raises LoratuiError for input that cannot describe one run (a rank outside the nodes, several nodes
    with no address for node 0, numbers that are not numbers).
    """
    env = os.environ if env is None else env
    nodes, rank, source = _nodes_and_rank(train, env)
    if nodes < 1:
        raise LoratuiError(f"train.nodes is {nodes} ({source}): at least 1 node is needed")
    if rank is not None and not 0 <= rank < nodes:
        raise LoratuiError(
            f"this node's rank is {rank}, but the run has {nodes} node{'s' if nodes > 1 else ''} "
            f"(ranks 0 to {nodes - 1})",
            hint="Set train.node_rank (--node-rank) below train.nodes (--nodes) on each machine: 0 on the main "
            "node, 1, 2 ... on the others.",
        )
    if nodes == 1:
        return Topology(1, 0, train.nproc, train.main_address, train.main_port, source)
    if rank is None:
        raise LoratuiError(
            f"train.nodes is {nodes} ({source}), but nothing says which node this is",
            hint="Set train.node_rank (--node-rank N) on each machine, or the NODE_RANK variable; under SLURM "
            "start one task per node with srun, which sets SLURM_NODEID.",
        )
    address = train.main_address or env.get("MASTER_ADDR") or _first_node(env)
    if not address:
        raise LoratuiError(
            f"train.nodes is {nodes}, but no address for node 0 is set",
            hint="Set train.main_address (--main-address HOST) to node 0's host name or IP, the same on every "
            "node, or the MASTER_ADDR variable (under SLURM it is the first host of SLURM_JOB_NODELIST).",
        )
    port = train.main_port or _env_int(env, "MASTER_PORT") or DEFAULT_PORT
    if not 0 < port < 65536:
        raise LoratuiError(f"the main port {port} is not a TCP port (1 to 65535)", hint="Set train.main_port.")
    return Topology(nodes, rank, train.nproc, address, port, source)


def world_size(train: TrainSection, env: Mapping[str, str] | None = None) -> int:
    """Processes of the run for the figures that divide by it (the estimate, ``auto`` batch settings).

    In a launched worker, torch's ``WORLD_SIZE``; elsewhere ``nodes x nproc`` as :func:`resolve` reads
    them, and ``nproc`` alone where the topology is incomplete (it is refused when training starts).
    """
    env = os.environ if env is None else env
    if env.get(WORKER_ENV) and (world := _env_int(env, "WORLD_SIZE")):
        return world
    try:
        return resolve(train, env).world
    except LoratuiError:
        return train.nproc


def for_printing(train: TrainSection, env: Mapping[str, str] | None = None) -> Topology:
    """The topology a printed launch (``--print-launch``) is for, as node 0: the nodes, address and port the
    config and the environment give, 2 nodes when they say 1 or nothing, no address when none is known."""
    env = os.environ if env is None else env
    nodes, _rank, source = _nodes_and_rank(train, env)
    address = train.main_address or env.get("MASTER_ADDR") or _first_node(env)
    port = train.main_port or _env_int(env, "MASTER_PORT") or DEFAULT_PORT
    return Topology(max(nodes, 2), 0, train.nproc, address, port, source)
