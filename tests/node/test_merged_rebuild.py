"""A published round's merged adapter that no live holder has (round-v1, "A merged adapter no holder has", issue 13).

The fault runner's sequence s11 (seed 2026): the coordinator's only copy of the latest merged blob
was corrupted, then the coordinator was SIGKILLed right after announcing it, before any participant
fetched it. Nobody could install the round and the community never moved on. Now a node that
cannot fetch it rebuilds it from the contributed updates and keeps it only if it hashes to the
announced sha256: the restarted coordinator (it holds every update) rebuilds it, the others fetch it.
Before the fix this test timed out waiting for round 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from fednode.node.daemon import Node
from fednode.wire.messages import AggregateAnnounce, Message
from tests.node.checks import check_fedavg, check_round_agreement, flip_first_byte
from tests.node.conftest import Cluster, cluster, wait_until

N = 3
RESTART_AFTER = 3.0  # virtual seconds the coordinator stays dead: the others try (and fail) to fetch meanwhile
WAIT = 300.0  # virtual seconds; every wait is on a condition
SECTIONS: dict[str, dict[str, Any]] = {
    "round": {"min_participants": 2, "max_participants": N, "wait_for_members": N, "max_rounds": 2,
              "round_timeout_seconds": 20.0},
}


def _arm_corrupt_and_kill(c: Cluster, fired: list[int]) -> None:
    """On round 1's AggregateAnnounce: corrupt the coordinator's (only) merged blob, let the
    announce go out, and kill the coordinator at once (nobody has fetched the blob yet)."""
    for i, node in list(c.nodes.items()):
        original = node.publish

        async def publish(message: Message, i: int = i, node: Node = node, original: Any = original) -> None:
            if isinstance(message, AggregateAnnounce) and message.round_number == 1 and not fired:
                fired.append(i)
                flip_first_byte(node.store.path(message.merged_sha256))
                await original(message)
                c.kill(i)
                await trio.lowlevel.checkpoint()  # raises Cancelled: the node is gone
            await original(message)

        node.publish = publish  # type: ignore[method-assign]
        node.driver.publish = publish


async def test_merged_blob_only_the_killed_coordinator_had_is_rebuilt_from_the_updates(
        tmp_path: Path, clock: trio.testing.MockClock) -> None:
    async with cluster(tmp_path) as c:
        for i in range(N):
            await c.start(i, N, **SECTIONS)
        fired: list[int] = []
        _arm_corrupt_and_kill(c, fired)
        await wait_until(lambda: bool(fired), WAIT)
        victim = fired[0]
        others = [c.nodes[i] for i in range(N) if i != victim]
        await trio.sleep(RESTART_AFTER)
        assert all(n.driver.progress.rounds_completed == 0 for n in others)  # nobody could get it
        await c.start(victim, N, **SECTIONS)
        nodes = [c.nodes[i] for i in range(N)]
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 2 for n in nodes), WAIT)
        first = check_round_agreement(nodes, 1)
        assert first["final_coordinator_node_id"] == nodes[victim].node_id
        # the blob every node installed is the announced one, and it is FedAvg of the accepted updates
        index_of = {n.node_id: i for i, n in enumerate(nodes)}
        merged = nodes[0].store.read(first["merged_sha256"])
        check_fedavg(first, merged, None, index_of)
        assert sum(n.driver.progress.merged_rebuilt for n in nodes) >= 1
        assert all(not n.driver.progress.merged_recovery for n in nodes)  # nothing left to recover
        check_round_agreement(nodes, 2)
        assert all(n.driver.progress.outcome_conflicts == 0 for n in nodes)
