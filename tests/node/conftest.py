"""Helpers for daemon tests: nodes on the memory transport with the fake trainer, on trio's clock."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fednode.config import Config, parse_config
from fednode.identity import Identity
from fednode.node.daemon import Node
from fednode.node.trainers import FakeTrainer
from fednode.transport.memory import MemoryLimits, MemoryNetwork, open_memory_transport
from fednode.transport.subscription import DEFAULT_MAX_MESSAGE_SIZE

EPOCH = 1_800_000_000.0  # virtual wall clock = EPOCH + trio.current_time()
# Real seconds of idleness before the virtual clock jumps: worker threads (sqlite, blob writes)
# must not let it run away (see test_crash.py).
AUTOJUMP_THRESHOLD = 0.01


@pytest.fixture(name="clock")
def autojump_clock_for_daemons(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """trio's virtual clock, jumping only after AUTOJUMP_THRESHOLD real seconds of idleness. (Named
    `clock` for the tests; the module's `clock()` below is the nodes' wall clock.)"""
    autojump_clock.autojump_threshold = AUTOJUMP_THRESHOLD
    return autojump_clock


def clock() -> float:
    return EPOCH + trio.current_time()


def node_config(data_dir: Path, index: int, n: int, **sections: dict[str, Any]) -> Config:
    base: dict[str, dict[str, Any]] = {
        "node": {"data_dir": str(data_dir), "name": f"node-{index}"},
        "community": {"id": "test"},
        "research": {"federated_learning": True},
        "coordinator": {"heartbeat_interval_seconds": 1.0},
        "round": {"min_participants": min(2, n), "max_participants": n, "round_timeout_seconds": 60.0,
                  "local_steps": 3, "max_rounds": 2, "wait_for_members": n},
        "learning": {"task": "fake", "node_index": index, "num_nodes": n},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    return parse_config("\n".join(lines), source=f"node-{index}.toml")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def seed_identity(i: int) -> Identity:
    if i < 255:
        return Identity.from_seed(bytes([i + 1]) * 32)
    return Identity.from_seed(hashlib.sha256(f"fednode-test-node-{i}".encode()).digest())  # the 500-node sim


@dataclasses.dataclass
class Cluster:
    network: MemoryNetwork
    tmp: Path
    nursery: trio.Nursery
    nodes: dict[int, Node] = dataclasses.field(default_factory=dict)
    scopes: dict[int, trio.CancelScope] = dataclasses.field(default_factory=dict)

    def make(self, i: int, n: int, **sections: dict[str, Any]) -> Node:
        cfg = node_config(self.tmp / f"node-{i}", i, n, **sections)
        identity = seed_identity(i)
        trainer = FakeTrainer(i) if cfg.research.federated_learning else None
        # A config that allows messages over the transport's default 64 KiB raises the transport's limit
        # too, as the libp2p factory does (a 500-member announce was refused by the transport). A lower
        # one leaves the transport at 64 KiB, so tests reach the node's own size check (tests/security).
        limits = MemoryLimits(max_message_size=max(DEFAULT_MAX_MESSAGE_SIZE, cfg.network.max_message_bytes),
                              subscription_buffer=cfg.network.subscription_buffer)
        return Node(cfg, identity, trainer=trainer, clock=clock, inline_training=True,
                    transport_factory=lambda ident: open_memory_transport(self.network, ident, limits=limits))

    async def start(self, i: int, n: int, **sections: dict[str, Any]) -> Node:
        return await self.run_node(i, self.make(i, n, **sections))

    async def run_node(self, i: int, node: Node) -> Node:
        """Run a node made by `make` (and perhaps altered by the test) as node i."""
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[assignment]
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.nodes[i], self.scopes[i] = node, scope
        return node

    def kill(self, i: int) -> None:
        """Abandon node i at whatever await point it is in (like a crash: no goodbye messages)."""
        self.network.vanish(self.nodes[i].node_id)
        self.scopes[i].cancel()


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `trio.to_thread.run_sync` work (blob store I/O) inline, so that the virtual clock may jump
    the moment every task waits (autojump threshold 0). With worker threads the clock has to wait
    for real idleness (test_sim50's 50 ms) at every distinct timer deadline, and 500 nodes' timers
    made the simulation idle most of its wall time (100 nodes, 3 rounds: 2.3 min of CPU in 10 min)."""
    async def run_sync(fn: Any, *args: Any, **_: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@asynccontextmanager
async def cluster(tmp: Path, *, seed: int = 0, auto_link_degree: int | None = None) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        network = MemoryNetwork(seed=seed) if auto_link_degree is None else \
            MemoryNetwork(seed=seed, auto_link_degree=auto_link_degree)
        c = Cluster(network, tmp, nursery)
        try:
            yield c
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate: Any, timeout: float = 600.0, step: float = 0.25) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)
