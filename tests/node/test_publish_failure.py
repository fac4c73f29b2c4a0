"""A coordinator whose outcome did not go out on gossip (the transport refused or failed the publish)
still installs the round: the outcome is saved, its heartbeats then name the round as finished, and
the members fetch the outcome by sync (sync-v1). Before, the failed publish skipped the install, the
heartbeats kept naming the previous round, and the round never finished anywhere (found by the
500-node simulation, whose transport refused the announce as too large)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fednode.errors import TransportError
from fednode.node.daemon import Node
from fednode.wire import codec
from fednode.wire.messages import AggregateAnnounce, Contribution, Message
from tests.node.conftest import cluster, seed_identity, wait_until


def fail_first_announce(node: Node) -> list[str]:
    failed: list[str] = []
    real = node.publish

    async def publish(message: Message) -> None:
        if isinstance(message, AggregateAnnounce) and not failed:
            failed.append(message.round_id)
            raise TransportError("injected: the announce did not go out")
        await real(message)

    node.publish = publish  # type: ignore[method-assign]
    node.driver.publish = publish
    return failed


async def test_a_coordinator_whose_announce_failed_still_installs_and_members_sync_it(  # type: ignore[no-untyped-def]
        tmp_path: Path, clock) -> None:
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [c.make(i, n, round={"max_rounds": 1}) for i in range(n)]
        failed = [fail_first_announce(node) for node in nodes]
        for i, node in enumerate(nodes):
            await c.run_node(i, node)
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 1 for node in nodes), timeout=120)
        assert sum(len(f) for f in failed) == 1  # the coordinator's one announce failed
        assert len({node.driver.progress.last_merged["sha256"] for node in nodes}) == 1


async def test_a_record_names_the_announced_contributions_when_a_full_disk_kept_the_outcome_in_memory(  # type: ignore[no-untyped-def]
        tmp_path: Path, clock) -> None:
    """Fault seed 1356839167 s22/s28: the node whose disk was full when the announce came kept it in
    memory only, and its round record listed its own view of the contributions instead."""
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n, round={"max_rounds": 1}) for i in range(n)]
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 1 for node in nodes), timeout=120)
        driver = nodes[1].driver
        state = next(iter(driver.rounds.values()))
        row = driver.db.get_round(state.round_id)
        assert row is not None and row.outcome
        announce = driver._announce_of(state, row.merged_sha256)
        assert announce is not None
        driver.db.set_outcome(state.round_id, b"")  # as if the disk had been full when it came ...
        assert driver._announce_of(state, row.merged_sha256) is None
        driver.job(state.round_id).unsaved_outcome = row.outcome  # ... and it was kept in memory
        assert driver._announce_of(state, row.merged_sha256) == announce


async def test_a_stored_announce_over_64_kib_is_read_back_under_the_configured_limit(  # type: ignore[no-untyped-def]
        tmp_path: Path, clock) -> None:
    """The 500-node simulation (network.max_message_bytes = 256 KiB): every node received and saved
    the round's 79 KB announce (500 contributions), then failed to install it ("oversize: 78831 bytes
    exceeds max_message_bytes=65536") because the saved announce was decoded under the codec's 64 KiB
    default instead of the node's configured limit; nobody ever installed round 1."""
    n = 2
    limit = 4 * 65536
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n, round={"max_rounds": 1}, network={"max_message_bytes": limit})
                 for i in range(n)]
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 1 for node in nodes), timeout=120)
        driver = next(node for node in nodes if node.node_id == node.driver.coordinator).driver
        state = next(iter(driver.rounds.values()))
        row = driver.db.get_round(state.round_id)
        assert row is not None and row.outcome
        small = driver._announce_of(state, row.merged_sha256)
        assert small is not None
        others = tuple(Contribution(seed_identity(100 + i).node_id, "ab" * 32, 1) for i in range(450))
        big = codec.sign(dataclasses.replace(small, contributions=small.contributions + others, sig=b""),
                         seed_identity(nodes.index(next(x for x in nodes if x.driver is driver))))
        data = codec.encode(big)
        assert 65536 < len(data) <= limit
        driver.db.set_outcome(state.round_id, data)
        assert driver._announce_of(state, row.merged_sha256) == big
