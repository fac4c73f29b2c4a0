"""Three honest daemons (FakeTrainer, memory transport, virtual clock) running two rounds, with
or without an adversary attached to the same network; and the checks every attack test makes.

Every run uses the same configuration (an allowlist naming the honest nodes and the adversary's
member key, so non-member attacks have something to bounce off), so an attacked run and a clean
run must end with byte-identical merged adapters: the attacker may not change the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio
import trio.testing

from fednode.blobs.serve import DEFAULT_MAX_STREAMS_PER_PEER
from fednode.identity import Identity
from fednode.node.daemon import MAX_HOLDERS_TRACKED, Node
from fednode.node.rounds import MAX_PENDING_MANIFESTS, MAX_ROUNDS_IN_MEMORY
from fednode.wire import codec
from tests.node.checks import check_round_agreement, read_record
from tests.node.conftest import Cluster, clock, cluster, seed_identity, wait_until
from tests.security.adversary import Adversary

HONEST = 3
ROUNDS = 2
COMMUNITY = "test"
MEMBER = Identity.from_seed(b"\xad" * 32)  # the adversary's allowlisted key
OUTSIDER = Identity.from_seed(b"\xae" * 32)  # a key the allowlist does not name
NODE_MAX_MESSAGE_BYTES = 32 * 1024  # below the transport's 64 KiB, so the node's own check is reached
# Stated memory bound: Python heap growth (tracemalloc peak) an attack may add over a clean run.
ATTACK_MEMORY_SLACK_BYTES = 8 << 20


def honest_ids() -> list[str]:
    return [seed_identity(i).node_id for i in range(HONEST)]


def sections(*, wait_for_members: int = HONEST) -> dict[str, dict[str, Any]]:
    return {
        "community": {"id": COMMUNITY, "members": [*honest_ids(), MEMBER.node_id]},
        "network": {"max_message_bytes": NODE_MAX_MESSAGE_BYTES},
        "round": {"max_participants": 8, "wait_for_members": wait_for_members, "max_rounds": ROUNDS},
    }


@dataclasses.dataclass
class Federation:
    cluster: Cluster
    nodes: list[Node]
    adversary: Adversary | None

    async def wait_rounds(self, n: int = ROUNDS) -> None:
        """Until every node completed n rounds and handled the gossip queued for it meanwhile.

        The rounds can end before an attack's last messages leave the nodes' inbound queues; a test
        that counts verdicts right after would miss them (seen: one Sybil heartbeat of 300).
        """
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= n for node in self.nodes))
        await trio.testing.wait_all_tasks_blocked()

    def merged(self) -> list[str]:
        """Merged sha256 of every round, after checking that every node holds and installed it."""
        return [str(check_round_agreement(self.nodes, k)["merged_sha256"]) for k in range(1, ROUNDS + 1)]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def coordinator_record(self, number: int) -> dict[str, Any]:
        record = read_record(self.nodes[0], number)
        return read_record(self.node(record["final_coordinator_node_id"]), number)

    def counters(self) -> list[dict[str, dict[str, int]]]:
        return [node.status().counters for node in self.nodes]


@contextlib.asynccontextmanager
async def federation(root: Path, name: str, *, adversary: Identity | None = None,
                     wait_for_members: int = HONEST) -> AsyncIterator[Federation]:
    async with cluster(root / name) as c:
        adv = None if adversary is None else Adversary(
            c.network, adversary, community_id=COMMUNITY, clock=clock, data_dir=root / name / "adversary")
        async with adv.attached() if adv is not None else contextlib.nullcontext():
            nodes = [await c.start(i, HONEST, **sections(wait_for_members=wait_for_members)) for i in range(HONEST)]
            yield Federation(c, nodes, adv)


@dataclasses.dataclass
class Peak:
    bytes: int = 0


@contextlib.contextmanager
def heap_peak() -> Iterator[Peak]:
    """Peak Python heap growth inside the block (tracemalloc; torch tensor storage is not traced,
    and the deltas here are a few KiB)."""
    codec.SHARED_DECODE_CACHE.clear()  # what earlier tests decoded would make the growth depend on order
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    out = Peak()
    try:
        yield out
    finally:
        _, peak = tracemalloc.get_traced_memory()
        out.bytes = peak - base
        if not started:
            tracemalloc.stop()


async def clean_run(root: Path) -> tuple[list[str], int]:
    """The same federation without the attacker: (merged sha256 per round, heap peak growth)."""
    with heap_peak() as peak:
        async with federation(root, "clean") as fed:
            await fed.wait_rounds()
            merged = fed.merged()
    return merged, peak.bytes


def assert_bounded(fed: Federation, *, heartbeating: set[str] | None = None) -> dict[str, int]:
    """Every structure an attacker can grow on an honest node is within its bound. `heartbeating`:
    the identities whose heartbeats may be in the member tables (default: the honest ones)."""
    allowed = set(honest_ids()) if heartbeating is None else heartbeating
    sizes: dict[str, int] = {}
    for node in fed.nodes:
        others = allowed - {node.node_id}
        assert set(node._heard) <= others, set(node._heard) - others
        assert len(node._heard) <= MAX_HOLDERS_TRACKED
        assert set(node._holders) <= set(node._heard)
        assert set(node.election.members) <= others, set(node.election.members) - others
        assert len(node.election.members) <= node.election.config.max_members
        assert len(node.validator._seen) <= node.validator.policy.seen_cache_size
        assert len(node.driver.pending_manifests) <= MAX_PENDING_MANIFESTS
        assert len(node.driver.rounds) <= MAX_ROUNDS_IN_MEMORY + 1
        assert len(node.blob_server._manifests) <= 65
        assert all(n <= DEFAULT_MAX_STREAMS_PER_PEER for n in node.blob_server._active.values())
        transport = node.transport
        assert transport is not None
        assert len(transport._seen) <= transport.limits.seen_cache_size  # type: ignore[attr-defined]
        sizes[node.node_id] = len(node.validator._seen)
    return sizes
